"""The sticky assignor without a broker: the plan's properties (hypothesis), the user-data
codec and its versioning, and the classmethod API aiokafka calls (metadata → assign →
on_assignment) wired through a stand-in for the cluster metadata (a partition count)."""

from __future__ import annotations

import asyncio
import functools
import random

import msgspec
import pytest
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.structs import TopicPartition as TP
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.consumers.cluster import (
    ASSIGNOR_NAME,
    Candidate,
    Membership,
    MembershipUnknown,
    TallyAssignor,
    make_assignor,
    plan_assignment,
)
from tally.schemas.errors import ConfigError
from tally.schemas.membership import (
    PROTOCOL_VERSION,
    MemberSubscription,
    OwnerEntry,
    OwnershipMap,
    UnreadableUserData,
    decode_map,
    decode_subscription,
    encode_map,
    encode_subscription,
)

# ------------------------------------------------------------------ strategies


@st.composite
def groups(draw: st.DrawFn, same_topics: bool) -> tuple[list[TP], dict[str, Candidate]]:
    """Partitions of 1-3 topics and 1-6 members holding random subsets of them."""
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    parts = [TP(f"t{i}", p) for i, n in enumerate(sizes) for p in range(n)]
    topics = sorted({tp.topic for tp in parts})
    ids = draw(
        st.lists(st.text("abcdef0123", min_size=1, max_size=4), min_size=1, max_size=6, unique=True)
    )
    members = {}
    for mid in ids:
        subscribed = (
            frozenset(topics)
            if same_topics
            else frozenset(draw(st.lists(st.sampled_from(topics), min_size=1, unique=True)))
        )
        held = frozenset(draw(st.lists(st.sampled_from(parts), unique=True)))
        members[mid] = Candidate(topics=subscribed, held=held)
    return parts, members


def _won(parts: list[TP], members: dict[str, Candidate]) -> dict[str, set[TP]]:
    """The claims each member wins by the rule: the first holder by member id."""
    won: dict[str, set[TP]] = {m: set() for m in members}
    for tp in parts:
        holder = next((m for m in sorted(members) if tp in members[m].held), None)
        if holder is not None:
            won[holder].add(tp)
    return won


# ------------------------------------------------------------------ plan properties


@given(groups(same_topics=False))
def test_every_partition_goes_to_exactly_one_subscriber(
    group: tuple[list[TP], dict[str, Candidate]],
) -> None:
    parts, members = group
    plan = plan_assignment(parts, members)
    assert set(plan) == set(members)
    subscribed = {tp for tp in parts if any(tp.topic in c.topics for c in members.values())}
    assigned = [tp for ps in plan.values() for tp in ps]
    assert sorted(assigned) == sorted(subscribed)  # covering, and no partition twice
    for mid, ps in plan.items():
        assert all(tp.topic in members[mid].topics for tp in ps), mid


@given(groups(same_topics=True))
def test_loads_differ_by_at_most_one_when_members_subscribe_alike(
    group: tuple[list[TP], dict[str, Candidate]],
) -> None:
    parts, members = group
    loads = [len(ps) for ps in plan_assignment(parts, members).values()]
    assert max(loads) - min(loads) <= 1


@given(groups(same_topics=True))
def test_only_the_surplus_moves_as_little_as_any_balanced_plan_could(
    group: tuple[list[TP], dict[str, Candidate]],
) -> None:
    """Partitions kept by the member that won their claim: each member keeps at least
    min(won, floor share), and in total as many as the best balanced assignment keeps
    (the ceil shares given to the members that won the most)."""
    parts, members = group
    plan = plan_assignment(parts, members)
    won = _won(parts, members)
    floor, extra = divmod(len(parts), len(members))
    ceil = floor + (1 if extra else 0)
    kept = {m: len(plan[m] & won[m]) for m in members}
    for m in members:
        assert kept[m] >= min(len(won[m]), floor), m
    at_ceil = sum(1 for m in members if len(won[m]) >= ceil)
    best = sum(min(len(w), floor) for w in won.values()) + min(extra, at_ceil)
    assert sum(kept.values()) == best


@given(groups(same_topics=False), st.randoms(use_true_random=False))
def test_the_plan_does_not_depend_on_member_order(
    group: tuple[list[TP], dict[str, Candidate]], rnd: random.Random
) -> None:
    parts, members = group
    items = list(members.items())
    rnd.shuffle(items)
    shuffled_parts = list(parts)
    rnd.shuffle(shuffled_parts)
    assert plan_assignment(shuffled_parts, dict(items)) == plan_assignment(parts, members)


@given(groups(same_topics=False))
def test_a_settled_group_stays_put(group: tuple[list[TP], dict[str, Candidate]]) -> None:
    """Members that hold exactly what they were given get exactly that again."""
    parts, members = group
    plan = plan_assignment(parts, members)
    settled = {m: Candidate(topics=c.topics, held=plan[m]) for m, c in members.items()}
    assert plan_assignment(parts, settled) == plan


def test_a_returning_member_gets_back_what_it_holds_when_balance_moves_partitions() -> None:
    """a and b took over c's partitions 4 and 5; c comes back holding them: balance moves two
    partitions to c, and they are the two c holds (a resume, not a replay) — whether c sorts
    first or last by member id."""
    parts = [TP("t", p) for p in range(6)]
    for c_id in ("c", "0c"):
        members = {
            "a": Candidate(frozenset({"t"}), frozenset(parts[i] for i in (0, 1, 4))),
            "b": Candidate(frozenset({"t"}), frozenset(parts[i] for i in (2, 3, 5))),
            c_id: Candidate(frozenset({"t"}), frozenset(parts[i] for i in (4, 5))),
        }
        plan = plan_assignment(parts, members)
        assert plan[c_id] == {parts[4], parts[5]}, c_id
        assert plan["a"] == {parts[0], parts[1]} and plan["b"] == {parts[2], parts[3]}


def test_a_new_member_takes_the_surplus_and_the_rest_stays() -> None:
    parts = [TP("t", p) for p in range(6)]
    members = {
        "a": Candidate(frozenset({"t"}), frozenset(parts[:3])),
        "b": Candidate(frozenset({"t"}), frozenset(parts[3:])),
        "c": Candidate(frozenset({"t"})),
    }
    plan = plan_assignment(parts, members)
    assert [len(plan[m]) for m in "abc"] == [2, 2, 2]
    assert plan["a"] < set(parts[:3]) and plan["b"] < set(parts[3:])


def test_unreadable_members_get_partitions_only_when_nobody_else_can() -> None:
    parts = [TP("t", p) for p in range(4)] + [TP("u", 0)]
    members = {
        "a": Candidate(frozenset({"t"})),
        "x": Candidate(frozenset({"t", "u"}), readable=False),
    }
    plan = plan_assignment(parts, members)
    assert plan["a"] == set(parts[:4])
    assert plan["x"] == {TP("u", 0)}  # only x subscribes to u


# ------------------------------------------------------------------ codec and versions


def test_subscription_and_map_round_trip() -> None:
    sub = MemberSubscription(url="http://h:1", held={"t": [0, 3]}, seen=7)
    assert decode_subscription(encode_subscription(sub)) == sub
    owners = OwnershipMap(
        map_version=8, you="m1", members={"m1": OwnerEntry(url="http://h:1", partitions={"t": [0]})}
    )
    assert decode_map(encode_map(owners)) == owners


def test_a_newer_writer_that_keeps_compat_is_read_and_its_new_fields_ignored() -> None:
    data = msgspec.json.encode(
        {"protocol": PROTOCOL_VERSION + 1, "compat": 1, "url": "http://h:1", "standby": {"t": [1]}}
    )
    assert decode_subscription(data).url == "http://h:1"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "does not run tally's group assignor"),
        (b"\x00\x01binary", "is not tally's"),
        (b'{"protocol": 9, "compat": 9, "url": "x"}', "upgrade this member"),
        (b'{"protocol": 0, "compat": 0, "url": "x"}', "versions start at 1"),
        (b'{"protocol": 1, "compat": 1, "url": 5}', "malformed"),
        (b'{"protocol": 1, "compat": 1, "url": "x", "held": {"t": [-1]}}', "malformed"),
    ],
)
def test_unreadable_user_data_says_what_and_what_to_do(data: bytes, words: str) -> None:
    with pytest.raises(UnreadableUserData, match=words):
        decode_subscription(data)
    with pytest.raises(UnreadableUserData):
        decode_map(data)


@pytest.mark.parametrize(
    "url", ["localhost:8750", "ftp://h:1", "http://0.0.0.0:8750", "http://[::]:8750", "/x"]
)
def test_an_unusable_advertised_url_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="--advertise"):
        make_assignor(url, set)


# ------------------------------------------------------------------ the aiokafka API


class _Partitions:
    """What assign() reads of aiokafka's ClusterMetadata: partitions per topic."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self.counts.get(topic)
        return None if n is None else set(range(n))


def _join(
    assignors: dict[str, type[TallyAssignor]], topics: set[str]
) -> dict[str, ConsumerProtocolMemberMetadata]:
    """Each member's JoinGroup metadata, as the leader receives it (encoded and decoded)."""
    out = {}
    for mid, cls in assignors.items():
        raw = cls.metadata(topics).encode()
        out[mid] = ConsumerProtocolMemberMetadata.decode(raw)
    return out


def _deliver(
    assignors: dict[str, type[TallyAssignor]], result: dict[str, ConsumerProtocolMemberAssignment]
) -> None:
    for mid, cls in assignors.items():
        raw = result[mid].encode()
        cls.on_assignment(ConsumerProtocolMemberAssignment.decode(raw))


def test_every_member_receives_the_same_map_with_everyones_url() -> None:
    held = {"m1": {TP("t", 0), TP("t", 1)}, "m2": set(), "m3": {TP("t", 5), TP("gone", 0)}}
    assignors = {
        mid: make_assignor(f"http://{mid}:8750", functools.partial(held.__getitem__, mid))
        for mid in held
    }
    metadata = _join(assignors, {"t"})
    leader = assignors["m2"]
    result = leader.assign(_Partitions({"t": 6}), metadata)
    assert set(result) == set(held)
    _deliver(assignors, result)
    views = {mid: cls.membership.view() for mid, cls in assignors.items()}
    assert {v.member_id for v in views.values()} == set(held)
    first = views["m1"]
    for mid, view in views.items():
        assert view.owners == first.owners and view.version == first.version == 1
        assert view.mine() == set(result[mid].partitions())
    assert {m: info.url for m, info in first.owners.items()} == {
        m: f"http://{m}:8750" for m in held
    }
    assert first.owners["m1"].partitions >= {TP("t", 0), TP("t", 1)}
    assert TP("t", 5) in first.owners["m3"].partitions
    assert first.url_of(TP("t", 5)) == "http://m3:8750"
    assert sorted(tp for info in first.owners.values() for tp in info.partitions) == [
        TP("t", p) for p in range(6)
    ]


def test_the_map_version_climbs_above_what_any_member_saw() -> None:
    assignors = {
        "a": make_assignor("http://a:1", set, membership=Membership(version=41)),
        "b": make_assignor("http://b:1", set),
    }
    result = assignors["b"].assign(_Partitions({"t": 2}), _join(assignors, {"t"}))
    _deliver(assignors, result)
    assert assignors["b"].membership.view().version == 42
    result = assignors["a"].assign(_Partitions({"t": 2}), _join(assignors, {"t"}))
    _deliver(assignors, result)
    assert assignors["a"].membership.view().version == 43


def _one_partition(member: str) -> set[TP]:
    return {TP("t", ord(member) % 4)}


def _held_of(candidate: Candidate) -> frozenset[TP]:
    return candidate.held


def test_assign_gives_the_same_bytes_whatever_the_member_order() -> None:
    assignors = {
        m: make_assignor(f"http://{m}:1", functools.partial(_one_partition, m)) for m in "qwer"
    }
    metadata = _join(assignors, {"t"})
    reversed_md = dict(reversed(list(metadata.items())))
    one = assignors["q"].assign(_Partitions({"t": 9}), metadata)
    two = assignors["q"].assign(_Partitions({"t": 9}), reversed_md)
    assert {m: a.encode() for m, a in one.items()} == {m: a.encode() for m, a in two.items()}


def test_an_unreadable_member_is_listed_with_the_problem_and_owns_nothing() -> None:
    good = make_assignor("http://good:1", lambda: {TP("t", 0)})
    metadata = {
        "good": good.metadata({"t"}),
        "stranger": ConsumerProtocolMemberMetadata(0, ["t"], b'{"protocol": 7, "compat": 7}'),
    }
    result = good.assign(_Partitions({"t": 3}), metadata)
    good.on_assignment(result["good"])
    view = good.membership.view()
    assert view.mine() == {TP("t", p) for p in range(3)}
    assert view.owners["stranger"].url is None and not view.owners["stranger"].partitions
    assert any("stranger" in p and "upgrade this member" in p for p in view.problems)


def test_duplicate_urls_and_missing_topics_are_reported_in_the_map() -> None:
    a = make_assignor("http://same:1", set)
    b = make_assignor("http://same:1", set)
    metadata = {"a": a.metadata({"t", "nope"}), "b": b.metadata({"t"})}
    result = a.assign(_Partitions({"t": 2}), metadata)
    a.on_assignment(result["a"])
    problems = a.membership.view().problems
    assert any("all advertise http://same:1" in p for p in problems)
    assert any("'nope'" in p for p in problems)


def test_an_unreadable_map_leaves_no_map_and_says_why() -> None:
    cls = make_assignor("http://me:1", set)
    cls.on_assignment(ConsumerProtocolMemberAssignment(0, [("t", [0])], b""))
    assert cls.membership.current() is None
    with pytest.raises(MembershipUnknown, match="does not run tally's group assignor"):
        cls.membership.owners()


def test_a_map_that_contradicts_the_assignment_is_refused() -> None:
    cls = make_assignor("http://me:1", set)
    data = encode_map(
        OwnershipMap(map_version=3, you="me", members={"me": OwnerEntry(url="http://me:1")})
    )
    cls.on_assignment(ConsumerProtocolMemberAssignment(0, [("t", [0])], data))
    with pytest.raises(MembershipUnknown, match="does not match"):
        cls.membership.view()


def test_each_assignor_class_keeps_its_own_member() -> None:
    one = make_assignor("http://one:1", lambda: {TP("t", 1)})
    two = make_assignor("http://two:1", set)
    assert one.name == two.name == ASSIGNOR_NAME
    assert one.membership is not two.membership
    assert decode_subscription(one.metadata({"t"}).user_data).held == {"t": [1]}
    assert decode_subscription(two.metadata({"t"}).user_data).held == {}


def test_held_must_return_topic_partitions() -> None:
    cls = make_assignor("http://me:1", lambda: [("t", "0")])
    with pytest.raises(TypeError, match="TopicPartition"):
        cls.metadata({"t"})


def test_wait_for_wakes_on_the_map_that_matches() -> None:
    async def scenario() -> None:
        m = Membership()
        waiting = asyncio.ensure_future(m.wait_for(lambda v: v.version == 2, timeout=30))
        for version in (1, 2):
            await asyncio.sleep(0)
            assert not waiting.done()
            m.update(OwnershipMap(map_version=version, you="a", members={}))
        assert (await waiting).version == 2
        with pytest.raises(TimeoutError, match="last map: v2"):
            await m.wait_for(lambda v: v.version == 3, timeout=0.01)

    asyncio.run(scenario())


@settings(max_examples=25)
@given(groups(same_topics=True))
def test_assign_through_the_api_matches_the_plan(
    group: tuple[list[TP], dict[str, Candidate]],
) -> None:
    parts, members = group
    counts: dict[str, int] = {}
    for tp in parts:
        counts[tp.topic] = max(counts.get(tp.topic, 0), tp.partition + 1)
    assignors = {
        m: make_assignor(f"http://{m}:1", functools.partial(_held_of, c))
        for m, c in members.items()
    }
    result = next(iter(assignors.values())).assign(
        _Partitions(counts), _join(assignors, set(counts))
    )
    plan = plan_assignment(parts, members)
    assert {m: set(a.partitions()) for m, a in result.items()} == plan
