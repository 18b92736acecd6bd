"""Expert parallelism over 2 gloo processes equals one process holding the global batch (fp32)."""

import json

from tests.parallel import workers
from tests.parallel.launch import assert_all_ok, run_ranks


def test_ep_forward_and_gradients_match_single_process(tmp_path):
    cases = list(workers.EP_CASES)
    codes = run_ranks(workers.ep_equivalence, tmp_path, cases, world_size=2, timeout=120)
    assert_all_ok(codes, tmp_path)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(report) == set(cases)
        for name, result in report.items():
            assert result["max_error"] < 1e-5, (rank, name, result)
