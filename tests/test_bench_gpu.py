"""The GPU acceptance run's code path, on CPU: ``star-mamba bench --gpu --dry-run``.

The harness is benchmarks/gpu/acceptance.py (a source checkout's, not the package's). Runs the
dry run once through the command line (a subprocess, so its seeds, threads and torch.compile
state stay out of this process) and checks the two files it writes; plus the pieces that decide
pass/fail (error recording, the peak table, the pytest summary parser) and the refusal where the
harness is missing. Nothing here asserts on a timing value.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from star_mamba import cli
from star_mamba.ops import available_backends

ROOT = Path(__file__).resolve().parent.parent
acceptance = cli.load_gpu_harness()  # benchmarks/gpu/acceptance.py
SECTIONS, TITLES = acceptance.SECTIONS, acceptance.TITLES


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_dry")
    proc = subprocess.run([sys.executable, "-m", "star_mamba", "bench", "--gpu", "--dry-run",
                           "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    # exit 1 means "ran, some section failed or errored": the files say which
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    assert (out / "gpu_acceptance.json").exists(), proc.stdout + proc.stderr
    results = json.loads((out / "gpu_acceptance.json").read_text())
    markdown = (out / "gpu_acceptance.md").read_text()
    return results, markdown, proc


def test_every_section_has_results_or_a_recorded_error(dry_run):
    results, _, _ = dry_run
    assert results["meta"]["dry_run"] is True and results["meta"]["complete"] is True
    assert list(results["sections"]) == list(SECTIONS)
    for name, entry in results["sections"].items():
        assert entry["status"] in ("ok", "error", "skipped"), (name, entry)
        if entry["status"] == "error":
            assert entry["error"], name  # the error line is recorded
            assert entry["traceback"], name
        elif entry["status"] == "ok":
            assert entry["result"], name
            assert entry["result"].get("summary"), name
        assert isinstance(entry["seconds"], (int, float))


def test_sections_that_must_run_on_cpu(dry_run):
    """Everything but the compile comparison runs on CPU (compile may fail inside dynamo)."""
    results, _, proc = dry_run
    for name in ("device", "tests", "scan_accuracy", "scan_speed", "pretrain_step",
                 "convergence"):
        entry = results["sections"][name]
        assert entry["status"] == "ok", (name, entry.get("error"), proc.stdout[-3000:])
    compile_ = results["sections"]["compile"]
    # eager is measured before compiling, so its numbers survive a compile failure
    assert compile_["result"]["eager_images_per_s"] > 0
    if compile_["status"] == "ok":
        assert compile_["result"]["compiled_images_per_s"] > 0
        assert compile_["result"]["first_loss_rel_diff"] < 1e-3


def test_device_facts(dry_run):
    r = dry_run[0]["sections"]["device"]["result"]
    assert r["torch"] == torch.__version__
    assert r["bf16_peak_tflops"] is None and r["peak_note"]  # a CPU has no entry
    assert r["gemm_bf16_tflops"] > 0
    assert set(r["scan_backends"]) == set(available_backends("cpu"))


def test_pytest_section_skips_without_cuda(dry_run):
    r = dry_run[0]["sections"]["tests"]["result"]
    assert r["returncode"] == 0
    assert r["skipped"] > 0 and r["passed"] == r["failed"] == r["errors"] == 0


def test_scan_backends_agree_with_reference(dry_run):
    r = dry_run[0]["sections"]["scan_accuracy"]["result"]
    expected = {b for b in available_backends("cpu") if b != "reference"}
    assert expected and set(r["backends"]) == expected
    rows = {(x["backend"], x["dtype"]): x for x in r["rows"]}
    assert set(rows) == {(b, d) for b in expected for d in ("float32", "bfloat16")}
    for (backend, dtype), row in rows.items():
        assert "error" not in row, row
        assert row["passed"], row
        assert set(row["grads"]) == {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"}
        every = [row["y"], row["last_state"], *row["grads"].values()]
        assert all(e["finite"] for e in every)
        if dtype == "float32":
            assert max(e["max_abs"] for e in every) < 1e-4, (backend, row)
            assert max(e["max_rel"] for e in every) < 1e-4, (backend, row)
        else:
            assert row["max_rel"] < 3e-2, (backend, row)


def test_scan_speed_rows(dry_run):
    r = dry_run[0]["sections"]["scan_speed"]["result"]
    plan = dry_run[0]["plan"]
    for backend in available_backends("cpu"):
        rows = [x for x in r["rows"] if x["backend"] == backend]
        assert len(rows) == len(plan["scan_widths"]) * len(plan["scan_images"]) * 2, backend
        for x in rows:
            assert "error" not in x and x["fwd_bwd_ms"] > 0 and x["forward_ms"] > 0
            assert x["length"] == acceptance.scan_length(x["images"], **plan["scan_geometry"])[0]


def test_pretrain_step_batch_search(dry_run):
    r = dry_run[0]["sections"]["pretrain_step"]["result"]
    plan = dry_run[0]["plan"]
    # capped at two doublings on CPU: 1, 2, 4 sequences, all fit
    assert [t["sequences"] for t in r["search"]] == [1, 2, 4]
    assert all(t["fits"] for t in r["search"]) and r["search_capped"]
    assert r["sequences"] == 4 and r["images"] == 4 * plan["model_overrides"]["images_per_sequence"]
    assert r["images_per_s"] > 0 and r["flops_per_step"] > 0
    assert r["mfu"] is None  # no peak for a CPU


def test_three_steps_make_the_loss_fall(dry_run):
    """The dry plan's 3 steps at lr 1e-3 lower the loss on CPU (without optimizer.step() it rises:
    1.24 -> 1.28), and the section passes on that criterion."""
    entry = dry_run[0]["sections"]["convergence"]
    r = entry["result"]
    assert r["steps"] == 3
    assert len(r["losses"]) == 3
    assert all(isinstance(x, float) and math.isfinite(x) for x in r["losses"])
    assert r["losses"][-1] < r["losses"][0], r["losses"]
    assert r["last_mean"] < r["first_mean"] and entry["passed"] is True, r


def test_markdown_has_a_row_per_section(dry_run):
    results, markdown, _ = dry_run
    lines = markdown.splitlines()
    for name in SECTIONS:
        rows = [ln for ln in lines if ln.startswith(f"| {TITLES[name]} |")]
        assert len(rows) == 1, name
        assert f"| {results['sections'][name]['status']} |" in rows[0]
        assert f"## {TITLES[name]}" in lines


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(plan, device, ctx, out):
        out["partial"] = 1
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(acceptance.SECTION_FUNCS, "scan_accuracy", broken)
    results = acceptance.run_acceptance(tmp_path, dry_run=True, log=lambda s: None,
                                       sections=["scan_accuracy", "convergence"])
    entry = results["sections"]["scan_accuracy"]
    assert entry["status"] == "error" and entry["passed"] is False
    assert entry["error"] == "RuntimeError: boom"
    assert entry["result"] == {"partial": 1}  # what it had measured is kept
    assert results["sections"]["convergence"]["status"] == "ok"
    saved = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert saved["sections"]["scan_accuracy"]["error"] == "RuntimeError: boom"
    assert "boom" in (tmp_path / "gpu_acceptance.md").read_text()


def test_isolated_sections_round_trip(tmp_path):
    """The GPU run's mode: each section in its own process; facts flow from section 1 on."""
    results = acceptance.run_acceptance(tmp_path, dry_run=True, isolate=True, log=lambda s: None,
                                       sections=["device", "pretrain_step"])
    assert results["meta"]["isolated"] is True
    for entry in results["sections"].values():
        assert entry["status"] == "ok", entry
        assert entry["process_seconds"] >= entry["seconds"]
    step = results["sections"]["pretrain_step"]["result"]
    assert step["fraction_of_measured_gemm"] is not None  # the GEMM rate came from "device"


def test_section_process_failures_are_recorded(tmp_path):
    result = tmp_path / "result.json"
    entry = acceptance.run_child([sys.executable, "-c", "import sys; sys.exit(3)"], result, 60)
    assert entry["status"] == "error" and "code 3" in entry["error"]
    entry = acceptance.run_child([sys.executable, "-c", "import time; time.sleep(60)"], result, 1)
    assert entry["status"] == "error" and "timed out" in entry["error"]
    code = f"open({str(result)!r}, 'w').write('{{not json')"
    entry = acceptance.run_child([sys.executable, "-c", code], result, 60)
    assert entry["status"] == "error" and "unreadable" in entry["error"]


def test_sections_past_the_time_budget_are_skipped(tmp_path, monkeypatch):
    plan = acceptance.dry_plan()
    plan.budget_s = 0
    monkeypatch.setattr(acceptance, "dry_plan", lambda: plan)
    results = acceptance.run_acceptance(tmp_path, dry_run=True, log=lambda s: None)
    assert {e["status"] for e in results["sections"].values()} == {"skipped"}
    assert "budget" in (tmp_path / "gpu_acceptance.md").read_text()


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 SXM5", 989e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA GeForce RTX 4090", None), ("NVIDIA H100 NVL", None)])
def test_bf16_peak_table(name, peak):
    value, note = acceptance.peak_bf16_flops(name)
    assert value == peak and note


def test_pytest_summary_parser():
    text = "....F.s\n=== 1 failed, 5 passed, 1 skipped, 2 deselected, 1 error in 3.2s ==="
    assert acceptance._pytest_counts(text) == dict(passed=5, failed=1, errors=1, skipped=1,
                                                  deselected=2, xfailed=0, xpassed=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_run_without_cuda_is_refused(tmp_path, capsys):
    from star_mamba.cli import main
    assert main(["bench", "--gpu", "--output-dir", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "gpu_acceptance.json").exists()


def test_default_run_compile_failure_is_recorded():
    """bench.py's eager-vs-compile helper: an unusable compile backend is a recorded error."""
    from star_mamba.tools.bench import _compiled_step
    model = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    out = _compiled_step(model, lambda m: m(x).sum().backward(), 1, "no_such_backend")
    assert out["compile_error"] and "compiled_step_ms" not in out
    out = _compiled_step(model, lambda m: m(x).sum().backward(), 1, "eager")
    assert "compile_error" not in out and out["compiled_step_ms"] >= 0 and out["compile_s"] >= 0


def test_cli_sections_and_budget(tmp_path, capsys):
    """--sections runs only the named sections, --budget is the run's time budget; both are
    recorded in the command line of the results, and misuse is one error line."""
    from star_mamba.cli import main
    assert main(["bench", "--gpu", "--dry-run", "--sections", "device,convergence",
                 "--budget", "100", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert list(results["sections"]) == ["device", "convergence"]
    assert results["meta"]["command"] == ("star-mamba bench --gpu --dry-run --budget 100 "
                                          "--sections device,convergence")
    assert results["meta"]["budget_s"] == 100
    capsys.readouterr()
    assert main(["bench", "--gpu", "--dry-run", "--sections", "device,warp"]) == 2
    assert "unknown section(s) ['warp']" in capsys.readouterr().err
    assert main(["bench", "--budget", "10"]) == 2
    assert "--budget belongs to --gpu" in capsys.readouterr().err
    assert main(["bench", "--gpu", "--dry-run", "--budget", "-1"]) == 2
    assert "--budget must be a positive" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [[], ["--dry-run"]])
def test_gpu_run_without_the_harness_is_one_line(tmp_path, monkeypatch, capsys, flags):
    """An installed wheel has no benchmarks/gpu/: one error line that says to use a checkout."""
    monkeypatch.setattr(cli, "gpu_harness_dir", lambda: tmp_path / "benchmarks" / "gpu")
    assert cli.main(["bench", "--gpu", *flags, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("star-mamba bench: error: the GPU acceptance run needs a source "
                          "checkout"), err
    assert "git clone" in err and "python benchmarks/gpu/acceptance.py" in err
    assert not (tmp_path / "out").exists()
