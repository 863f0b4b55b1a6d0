"""How the stats of several loaders add up: the shards of one drain run side by side,
a drain follows the run's own loader."""

from sinks.redis import LoadStats


def test_shards_add_their_counts_and_a_profile_deleted_by_one_stays_deleted():
    # shard 0 holds u1's totals (consent withdrawn: deleted); shard 1 wrote u1's sessions part before
    a = LoadStats(records=3, profile_writes=2, users={"u2"}, deleted={"u1"}, stream_added=1)
    b = LoadStats(records=4, profile_writes=3, users={"u1", "u3"}, stream_added=2)
    total = LoadStats.merged([a, b])
    assert (total.records, total.profile_writes, total.stream_added) == (7, 5, 3)
    assert total.users == {"u2", "u3"} and total.deleted == {"u1"}


def test_in_order_the_later_loader_wins():
    follow = LoadStats(users={"u1", "u2"}, deleted={"u3"})
    drain = LoadStats(users={"u3"}, deleted={"u1"})
    total = LoadStats.merged([follow, drain], in_order=True)
    assert total.users == {"u2", "u3"} and total.deleted == {"u1"}
