"""bench/transformer_lm.py: the corpus/padding helpers, the model, and the --quick run end to
end (seconds): JSON structure, finite losses, AdamW's validation loss decreasing."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from .conftest import BENCH

torch = pytest.importorskip("torch")
pytest.importorskip("curvlinalg_torch")

import transformer_lm  # noqa: E402


def test_windows_cover_every_target_once_and_pad_with_ignore_index():
    document = bytes(range(1, 12))  # 11 bytes: 10 targets
    pieces = transformer_lm.windows(document, context=4)
    assert [len(p) for p in pieces] == [5, 5, 3]
    targets = [b for p in pieces for b in p[1:]]
    assert targets == list(document[1:])
    inputs, labels = transformer_lm.pad(pieces, context=4)
    assert inputs[2] == [9, 10, 0, 0] and labels[2] == [10, 11, -100, -100]
    assert all(len(row) == 4 for row in inputs + labels)


def test_documents_split_at_top_level_statements():
    text = b"import os\n\ndef f():\n    if x:\n        pass\n\nclass C:\n    pass\n"
    assert transformer_lm.documents(text) == [
        b"import os",
        b"def f():\n    if x:\n        pass",
        b"class C:\n    pass",
    ]


def test_padded_positions_do_not_change_the_loss():
    model = transformer_lm.build_model(layers=1, width=16, heads=2, context=8, seed=0)
    tokens = torch.randint(1, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    targets[1, 5:] = transformer_lm.IGNORE
    logits = model(tokens)
    assert logits.shape == (2, 8, 256)
    real = targets != transformer_lm.IGNORE
    expected = torch.nn.functional.cross_entropy(logits[real], targets[real])
    torch.testing.assert_close(transformer_lm.lm_loss(logits, targets), expected)
    # causal: changing a later (padded) input does not change earlier logits
    changed = tokens.clone()
    changed[1, 5:] = 0
    torch.testing.assert_close(model(changed)[1, :5], logits[1, :5])
    assert model.head.weight is model.embed.weight


@pytest.mark.smoke
def test_transformer_lm_quick(tmp_path):
    out, fig = tmp_path / "transformer.json", tmp_path / "transformer_loss.png"
    command = [sys.executable, str(BENCH / "transformer_lm.py"), "--quick", "--threads", "1"]
    command += ["--json", str(out), "--figure", str(fig)]
    subprocess.run(command, check=True, capture_output=True, timeout=240)
    result = json.loads(out.read_text())
    assert fig.stat().st_size > 0
    assert set(result) == {"meta", "summary", "curves", "step_time"}
    assert result["meta"]["corpus"]["licence"].startswith("Python Software Foundation")
    names = ["adamw lr=0.003", "kfac", "foof", "ng"]
    assert list(result["curves"]) == names and list(result["summary"]) == names
    check_quick_result(result, names)
    for name in names:
        curve = result["curves"][name]
        if name != names[0]:
            assert curve["captured_layers"] == [
                f"blocks.0.{layer}" for layer in ("qkv", "proj", "fc", "fc2")
            ]
            assert curve["skipped_steps"] == 0


def check_quick_result(result: dict, names: list[str]) -> None:
    """What the torch and JAX ``--quick`` runs share: finite, complete curves, AdamW learning,
    the target and the step-time table (``names[0]`` is the AdamW baseline)."""
    assert list(result["curves"]) == names and list(result["summary"]) == names
    for name in names:
        curve = result["curves"][name]
        assert len(curve["train_loss"]) == 40
        assert len(curve["step"]) == len(curve["seconds"]) == len(curve["val_loss"]) == 5
        assert all(math.isfinite(v) for v in curve["train_loss"] + curve["val_loss"])
        assert curve["seconds"] == sorted(curve["seconds"])
        assert curve["diverged_at_step"] is None and curve["error"] is None
    adamw = result["curves"][names[0]]["val_loss"]
    assert all(later < earlier for earlier, later in zip(adamw, adamw[1:]))
    assert adamw[-1] < adamw[0] - 0.5  # from ~ln 256 = 5.55 nats/byte
    assert result["meta"]["target_val_loss"] == adamw[-1]
    assert result["summary"][names[0]]["time_to_target"]["fraction_of_adamw_time"] == 1.0
    entries = result["step_time"]["entries"]
    assert [e["name"] for e in entries] == names
    assert entries[0]["ratio"] == 1.0
    assert all(e["median_ms"] > 0 and e["q1_ms"] <= e["median_ms"] <= e["q3_ms"] for e in entries)
