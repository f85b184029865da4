"""bench.precision_compare: the rule that decides whether bf16 may become a CPU's auto precision."""

import json

import pytest

from bench import precision_compare


def seeds_folder(root, amp, errors, epochs=15, done=None):
    for seed, error in enumerate(errors):
        run = root / f"seed-{seed}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"recipe": {"epochs": epochs},
                                                     "runtime": {"amp": amp, "channels_last": True}}))
        last = epochs if done is None else done
        (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "test_error": error + (last - e) * 0.01})
                                                   + "\n" for e in range(1, last + 1)))
    return root


@pytest.mark.parametrize("bf16, expected", [
    ([0.150, 0.152, 0.149], "holds"),  # within the fp32 spread
    ([0.156, 0.157, 0.156], "holds"),  # outside it, but 0.4 points from the fp32 mean
    ([0.162, 0.160, 0.161], "fails"),  # 0.9 points worse
    ([0.140, 0.141, 0.142], "fails"),  # better by more than the rule allows: still not the same computation
])
def test_bf16_holds_within_the_fp32_spread_or_half_a_point(tmp_path, bf16, expected):
    fp32 = seeds_folder(tmp_path / "fp32", "off", [0.148, 0.155, 0.153])
    result = precision_compare.compare(fp32, seeds_folder(tmp_path / "bf16", "bf16", bf16))
    assert result["verdict"] == expected, result["why"]
    assert result["fp32"]["mean"] == pytest.approx(0.152) and result["bf16_runs"]["seed-0"]["amp"] == "bf16"


def test_unfinished_runs_leave_the_verdict_pending(tmp_path, capsys):
    fp32 = seeds_folder(tmp_path / "fp32", "off", [0.15, 0.15, 0.15])
    bf16 = seeds_folder(tmp_path / "bf16", "bf16", [0.15, 0.15, 0.15], done=4)
    assert precision_compare.main([str(fp32), str(bf16), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert result["verdict"] == "pending" and "bf16 seed-2 at epoch 4 of 15" in result["why"]
    assert "bf16 seed-0: epoch 4/15" in capsys.readouterr().out
