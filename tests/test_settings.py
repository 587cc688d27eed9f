"""The one settings layer: flag > environment > TOML file > default, for every command.

`tally.consumers.cli.settings.load` in process for the rules (sections over top-level keys,
shared keys, typos refused, the layer named in errors), and `tally query` / `tally status`
as subprocesses for the precedence a user sees: each layer points at a different store
(or at a server that does not answer), and the answer says which one was read.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from consumer_util import TALLY, child_env, free_port

from tally.consumers.cli.settings import load
from tally.engine import Store, TableAggregate
from tally.engine.triggers import Applier
from tally.schemas import ChangeEvent, ConfigError
from tally.schemas.config import (
    COMMANDS,
    DEFAULT_BOOTSTRAP_SERVERS,
    ConsumerSettings,
    ProduceSettings,
    QuerySettings,
    ReconcileSettings,
    StatusSettings,
)

# ---------------------------------------------------------------- the rules, in process


def test_each_layer_beats_the_one_below_for_produce(tmp_path: Path) -> None:
    toml = tmp_path / "tally.toml"
    toml.write_text('timeout = 3\nbootstrap_servers = "file:1"\nprogress = "bar"\n')
    s = load(ProduceSettings, {}, str(toml), env={}).settings
    assert (s.timeout, s.bootstrap_servers, s.progress) == (3.0, "file:1", "bar")
    env = {"TALLY_TIMEOUT": "4", "TALLY_BOOTSTRAP_SERVERS": "env:1"}
    loaded = load(ProduceSettings, {}, str(toml), env=env)
    assert (loaded.settings.timeout, loaded.settings.bootstrap_servers) == (4.0, "env:1")
    assert dict(loaded.origin) == {"timeout": "env", "bootstrap_servers": "env", "progress": "file"}
    loaded = load(ProduceSettings, {"timeout": 5.0, "bootstrap_servers": None}, str(toml), env=env)
    assert (loaded.settings.timeout, loaded.settings.bootstrap_servers) == (5.0, "env:1")
    assert loaded.origin["timeout"] == "flag"
    d = load(ProduceSettings, {}, None, env={}).settings
    assert d == ProduceSettings() and d.bootstrap_servers == DEFAULT_BOOTSTRAP_SERVERS


def test_a_section_wins_over_top_level_keys_and_top_level_keys_are_shared(tmp_path: Path) -> None:
    toml = tmp_path / "tally.toml"
    toml.write_text(
        'data_dir = "/shared"\nbootstrap_servers = "k:1"\nurl = "http://h:1"\n'
        'topics = { scores = "pg.scores" }\n'
        '[query]\ndata_dir = "/for-query"\n'
        "[consume]\nbatch-size = 7\n"  # a dash stands for an underscore
    )
    q = load(QuerySettings, {}, str(toml), env={}).settings
    assert (q.data_dir, q.url) == ("/for-query", "http://h:1")
    st = load(StatusSettings, {}, str(toml), env={}).settings  # [query] is not [status]'s
    assert (st.data_dir, st.bootstrap_servers) == ("/shared", "k:1")
    c = load(ConsumerSettings, {}, str(toml), env={}).settings  # url is not a consume setting
    assert (c.data_dir, c.batch_size, c.topics) == ("/shared", 7, {"scores": "pg.scores"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dta_dir = 1\n", "unknown setting 'dta_dir'"),
        ("[query]\nbootstrap_servers = 'x'\n", "[query] has no setting 'bootstrap_servers'"),
        (
            "[status]\nurl = 'u'\n[produce]\nbatch_size = 1\n",
            "[produce] has no setting 'batch_size'",
        ),
        ("[nope]\nx = 1\n", "unknown setting 'nope'"),
        ("query = 1\n", "'query' names a command"),
        ("timeout = [\n", "not valid TOML"),
    ],
)
def test_typos_in_the_file_are_refused_for_every_command(
    tmp_path: Path, text: str, message: str
) -> None:
    toml = tmp_path / "tally.toml"
    toml.write_text(text)
    for kind in (StatusSettings, ReconcileSettings):  # whichever command reads the file
        with pytest.raises(ConfigError, match=f"config file .*{_re(message)}"):
            load(kind, {}, str(toml), env={})


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_an_invalid_value_names_its_layer(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text("[reconcile]\nprogress = 'sometimes'\n")
    with pytest.raises(
        ConfigError,
        match=r"\$\.progress` \(from .*t\.toml \('progress' at top level or in \[reconcile\]\)\)",
    ):
        load(ReconcileSettings, {}, str(toml), env={})
    with pytest.raises(ConfigError, match=r"\$\.timeout` \(from TALLY_TIMEOUT\)"):
        load(QuerySettings, {}, None, env={"TALLY_TIMEOUT": "0"})
    with pytest.raises(ConfigError, match=r"\$\.timeout` \(from --timeout\)"):
        load(QuerySettings, {"timeout": -2.0}, None, env={})


def test_the_file_comes_from_the_flag_then_the_environment_then_the_working_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("flag", "env", "cwd"):
        (tmp_path / f"{name}.toml").write_text(f'url = "http://{name}"\n')
    (tmp_path / "tally.toml").write_text('url = "http://cwd"\n')
    monkeypatch.chdir(tmp_path)
    env = {"TALLY_CONFIG": str(tmp_path / "env.toml")}
    assert (
        load(QuerySettings, {}, str(tmp_path / "flag.toml"), env=env).settings.url == "http://flag"
    )
    assert load(QuerySettings, {}, None, env=env).settings.url == "http://env"
    loaded = load(QuerySettings, {}, None, env={})
    assert (loaded.settings.url, loaded.config_file) == ("http://cwd", "tally.toml")
    with pytest.raises(ConfigError, match=r"config file '.*missing\.toml' does not exist"):
        load(QuerySettings, {}, None, env={"TALLY_CONFIG": str(tmp_path / "missing.toml")})


def test_every_command_has_settings_and_a_default_for_each() -> None:
    assert set(COMMANDS) == {
        "consume",
        "rebuild",
        "query",
        "status",
        "produce",
        "reconcile",
        "demo",
    }
    for name, kind in COMMANDS.items():
        assert kind.command == name
        kind()  # every setting has a default, and the defaults are valid


# ---------------------------------------------------------------- what a user sees


def build_store(path: Path, n: int) -> None:
    """A store whose aggregate ``scores`` holds ``n`` items: its count names the store."""
    d = TableAggregate("scores", table="scores", sort_key="score")
    with Store.open(path) as store:
        Applier(store, [d]).apply_events(
            [ChangeEvent("scores", "upsert", i, {"id": i, "score": i}) for i in range(n)]
        )


def query_count(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TALLY, "query", *args, "scores", "count", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(**env),
        cwd=cwd,
        check=False,
    )


def test_tally_query_reads_the_store_of_the_highest_layer(tmp_path: Path) -> None:
    for name, n in (("tally-data", 1), ("file-top", 2), ("file-query", 3), ("env", 4), ("flag", 5)):
        build_store(tmp_path / name, n)

    def count(*args: str, **env: str) -> int:
        res = query_count(tmp_path, *args, **env)
        assert res.returncode == 0, res.stderr
        return int(json.loads(res.stdout))

    assert count() == 1  # the default, ./tally-data
    toml = tmp_path / "tally.toml"
    toml.write_text('data_dir = "file-top"\n')
    assert count() == 2
    toml.write_text('data_dir = "file-top"\n[query]\ndata_dir = "file-query"\n')
    assert count() == 3
    assert count(TALLY_DATA_DIR="env") == 4
    assert count("--data-dir", "flag", TALLY_DATA_DIR="env") == 5
    other = tmp_path / "other.toml"
    other.write_text('[query]\ndata_dir = "flag"\n')
    assert count(TALLY_CONFIG=str(other)) == 5  # $TALLY_CONFIG instead of ./tally.toml
    assert count("--config", str(toml), TALLY_CONFIG=str(other)) == 3


def test_the_source_is_the_url_or_data_dir_of_the_highest_layer(tmp_path: Path) -> None:
    build_store(tmp_path / "tally-data", 1)
    build_store(tmp_path / "env", 4)
    nobody = f"http://127.0.0.1:{free_port()}"

    def source(*args: str, **env: str) -> str:
        res = query_count(tmp_path, *args, "--timeout", "5", **env)
        if res.returncode == 1 and "cannot reach tally" in res.stderr:
            return "url"
        assert res.returncode == 0, res.stderr
        return f"data dir with {json.loads(res.stdout)}"

    assert source(TALLY_URL=nobody) == "url"
    assert (
        source("--data-dir", "env", TALLY_URL=nobody) == "data dir with 4"
    )  # a flag beats the env
    assert source(TALLY_URL=nobody, TALLY_DATA_DIR="env") == "url"  # one layer names both: the url
    (tmp_path / "tally.toml").write_text(f'url = "{nobody}"\n')
    assert source() == "url"
    assert source(TALLY_DATA_DIR="env") == "data dir with 4"  # the env beats the file
    res = query_count(tmp_path, "--url", nobody, "--data-dir", "env")
    assert res.returncode == 2 and "not both" in res.stderr


def test_tally_status_takes_its_broker_from_the_status_section(tmp_path: Path) -> None:
    """The same rules for another command: [status] over the top-level key, env over both,
    the flag over all; `tally status` names the broker it asked for the lag."""
    from tally.consumers.runtime.streams import offset_key

    build_store(tmp_path / "tally-data", 1)
    with Store.open(tmp_path / "tally-data") as store, store.batch() as b:
        b.put_meta(offset_key("t", 0), (1).to_bytes(8, "big"))  # a consumed partition: lag asked
    top, section, env, flag = (f"127.0.0.1:{free_port()}" for _ in range(4))
    (tmp_path / "tally.toml").write_text(
        f'bootstrap_servers = "{top}"\n[status]\nbootstrap_servers = "{section}"\n'
    )

    def broker(*args: str, **env: str) -> str:
        res = subprocess.run(
            [TALLY, "status", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(COLUMNS="200", **env),
            cwd=tmp_path,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        line = next(ln for ln in res.stdout.splitlines() if "broker unreachable at" in ln)
        return line.rsplit(" ", 1)[-1]

    assert broker() == section
    assert broker(TALLY_BOOTSTRAP_SERVERS=env) == env
    assert broker("--bootstrap-servers", flag, TALLY_BOOTSTRAP_SERVERS=env) == flag
