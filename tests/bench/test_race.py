"""bench/race.py: the commands it runs and the tables / figure it builds.

``race.py --quick`` runs five benchmarks end to end and takes minutes on the shared 2-core
machine (well over a minute even single-threaded), too slow for the test suite. The report
functions are tested instead on the JSON that real ``race.py --quick --threads 1`` runs wrote
(tests/bench/data/race_quick/). The three torch step files come from one run of
``race.py --quick --threads 1 --only torch_step,torch_natural_gradient,torch_conv_step`` in the
bench virtualenv (bench/peers.py; kfac-pytorch, ASDL and BackPACK installed, so the peers'
entries are in it), with the block-timing protocol of bench/timing.py, copied unchanged;
kron.json and woodbury.json (an earlier run) keep their ``args`` and only the result entries
that race.py reads, values untouched."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import race  # bench/race.py: tests/bench/conftest.py puts bench/ on sys.path

from .conftest import BENCH

DATA = Path(__file__).resolve().parent / "data" / "race_quick"


@pytest.fixture
def results():
    return race.load_results(DATA)


def test_fixture_holds_every_benchmark(results):
    assert set(results) == set(race.BENCHMARKS)
    assert race.is_quick(results)


def test_commands_pin_threads_and_forward_quick(tmp_path):
    for name, (script, json_name) in race.BENCHMARKS.items():
        command = race.command_for(name, tmp_path, 3, quick=True)
        assert command[0] == sys.executable
        assert command[1] == str(BENCH / script)
        assert command[command.index("--threads") + 1] == "3"
        assert "--quick" in command
        assert command[command.index("--json") + 1] == str(tmp_path / json_name)
        assert "--quick" not in race.command_for(name, tmp_path, 2, quick=False)
    env = race.child_env(3)
    assert [env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")] == [
        "3"
    ] * 3


def test_torch_entries_come_from_the_json(results):
    rows = race.torch_entries(results)
    step = results["torch_step"]["entries"]
    ng = results["torch_natural_gradient"]["entries"]
    assert [r["name"] for r in rows] == [e["name"] for e in step] + [e["name"] for e in ng]
    for row, entry in zip(rows, step + ng):
        if "failed" in entry:
            assert "ratio" not in row
            continue
        assert row["ratio"] == entry["ratio"] and row["median_ms"] == entry["median_ms"]
        assert row["step_ratio"] == entry["step_ratio"]
        assert row["round"] == (
            entry["round_ratio"]["q1"],
            entry["round_ratio"]["median"],
            entry["round_ratio"]["q3"],
        )
    assert any(r["peer"] for r in rows)  # the fixture run had the peers installed
    assert any(r["name"].startswith("kfac-pytorch") for r in rows)
    conv = race.torch_entries(results, ("torch_conv_step",))
    assert [r["name"] for r in conv] == [e["name"] for e in results["torch_conv_step"]["entries"]]


def test_fixture_ratios_follow_from_the_block_times(results):
    # The JSON's ratios are those of timing.summarise over the recorded blocks.
    for source in race.FIGURE_SOURCES + ("torch_conv_step",):
        entries = [e for e in results[source]["entries"] if "failed" not in e]
        base = entries[0]["block_s"]
        assert entries[0]["name"] in race.BASELINES
        assert len(base) == results[source]["meta"]["rounds"]
        for entry in entries:
            blocks = entry["block_s"]
            assert entry["median_ms"] == pytest.approx(1e3 * statistics.median(blocks))
            assert entry["ratio"] == pytest.approx(
                statistics.median(blocks) / statistics.median(base)
            )
            per_round = [t / b for t, b in zip(blocks, base)]
            assert entry["round_ratio"]["median"] == pytest.approx(statistics.median(per_round))


def test_markdown_has_every_entry_and_headline(results):
    text = race.build_markdown(results, {}, race.is_quick(results), "race.png")
    for entry in results["torch_step"]["entries"] + results["torch_natural_gradient"]["entries"]:
        assert f"| {entry['name']}" in text
    for entry in results["torch_step"]["entries"]:
        if "failed" not in entry:
            assert f"| {entry['ratio']:.2f} |" in text
    for name, target in race.TARGETS.items():
        assert f"≤ {target:g}:" in text, name
    kron_ops = [r for r in results["kron"]["results"] if r.get("kind") == "op"]
    for r in kron_ops:
        assert f"| {r['backend']} | {r['name']} |" in text
        assert f"{r['ratio_to_gemm']:.0%}" in text
    woodbury = [r for r in results["woodbury"]["results"] if "speedup" in r]
    assert woodbury
    for r in woodbury:
        assert f"| {r['backend']} | {r['name']} |" in text
        assert f"{r['speedup']:.0f}×" in text
    for row in results["torch_conv_step"]["entries"]:
        assert f"| {row['name']} |" in text and f"| {row['ratio']:.2f} |" in text
    assert "consecutive steps per entry, order shuffled per round" in text
    assert "not applicable to this --quick run" in text
    assert "![step time / SGD](race.png)" in text


def test_failed_peer_is_a_row_without_numbers(results):
    step = results["torch_step"]
    peer = next(e for e in step["entries"] if e.get("peer"))
    failed = {"name": peer["name"], "peer": True, "failed": "raised at its step 3: a | b"}
    step["entries"] = [failed if e is peer else e for e in step["entries"]]
    rows = {r["name"]: r for r in race.torch_entries(results)}
    assert "ratio" not in rows[peer["name"]]
    text = "\n".join(race.step_table(results))
    assert f"| {peer['name']} (peer) | failed, dropped: raised at its step 3: a \\| b |" in text


def test_missing_benchmark_is_reported_not_invented(results):
    partial = {k: v for k, v in results.items() if k != "kron"}
    text = race.build_markdown(partial, {}, True, None)
    assert "_no result (bench_kron.py did not write its JSON)_" in text
    assert "![" not in text


def test_report_only_rebuilds_markdown_and_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for path in DATA.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    assert race.main(["--report-only", "--out", str(tmp_path)]) == 0
    png = tmp_path / "race.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "race.md").read_text()
    assert "Mode: --quick" in text
    runs = json.loads((DATA / "race_runs.json").read_text())
    for run in runs.values():
        assert run["command"] in text
    assert "wrote" in capsys.readouterr().out


def test_figure_needs_a_torch_entry(tmp_path, results):
    pytest.importorskip("matplotlib")
    only_core = {k: results[k] for k in ("kron", "woodbury")}
    assert not race.build_figure(only_core, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_only_reruns_one_benchmark_and_keeps_the_others(tmp_path, monkeypatch):
    for path in DATA.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    kept = json.loads((DATA / "race_runs.json").read_text())
    (tmp_path / "torch_conv_step.json").unlink()
    ran = []

    def fake_run_all(names, out, threads, quick):
        ran.extend(names)
        shutil.copy(DATA / "torch_conv_step.json", out / "torch_conv_step.json")
        return {name: {"command": f"run {name}", "returncode": 0, "wall_s": 1.0} for name in names}

    monkeypatch.setattr(race, "run_all", fake_run_all)
    assert race.main(["--only", "torch_conv_step", "--out", str(tmp_path)]) == 0
    assert ran == ["torch_conv_step"]
    runs = json.loads((tmp_path / "race_runs.json").read_text())
    assert runs["torch_conv_step"]["command"] == "run torch_conv_step"
    for name, record in kept.items():
        if name == "torch_conv_step":  # re-run: its new record replaced the fixture's
            assert runs[name] != record
            continue
        assert runs[name] == record
        assert (tmp_path / race.BENCHMARKS[name][1]).exists()
    text = (tmp_path / "race.md").read_text()
    assert "| torch_conv_step | 0 | 1.0 |" in text and "| kfac u=30 |" in text
    with pytest.raises(SystemExit):
        race.main(["--only", "kron", "--skip", "woodbury", "--out", str(tmp_path)])
