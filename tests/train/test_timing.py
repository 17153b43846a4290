from bakeoff.common.timing import phase_seconds, training_seconds


def test_training_time_is_the_sum_of_phases_not_a_stale_total():
    timing = {"seconds": {"weights_load": 2.0, "trunk_caching": 176.5, "block_training": 256.9, "total": 263.2,
                          "wall": 300.0}}
    assert phase_seconds(timing) == {"weights_load": 2.0, "trunk_caching": 176.5, "block_training": 256.9}
    assert training_seconds(timing) == 435.4
    assert training_seconds({"seconds": {"total": 10.0}}) is None and training_seconds({}) is None
