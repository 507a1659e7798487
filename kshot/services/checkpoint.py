"""Checkpoints: tensors in safetensors, everything else in JSON. No pickle, ever.

One ``.safetensors`` file holds a learner's weights and buffers (``learner.*``), optionally the
outer optimiser's tensors (``optim.*``), and in its header metadata the JSON needed to rebuild and
resume: the learner (algorithm, options, backbone spec), the resolved training config, and the
training state. Loading parses JSON and raw tensors only, so a checkpoint cannot run code.
Files are written atomically: an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kshot.services.files import atomic_path
from kshot.errors import CheckpointError

FORMAT = "kshot-checkpoint/1"


@dataclass
class Checkpoint:
    """What a checkpoint file holds, parsed."""

    learner: dict[str, Any]  # {"algo", "options", "model": {"name", "kwargs"}}
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    train_state: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None  # an optimizer.state_dict(), rebuilt
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike, learner: torch.nn.Module, config: dict | None = None,
                    train_state: dict | None = None, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None) -> Path:
    """Write ``learner`` (and optionally the optimiser and training state) to ``path`` atomically.

    ``learner.spec()`` says how to rebuild it (algorithm, options, backbone); the build layer
    (:func:`kshot.runs.build.learner_from_checkpoint`) reads it back."""
    tensors = {f"learner.{k}": v.detach().contiguous().clone().cpu() for k, v in learner.state_dict().items()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "learner": learner.spec(),
        "config": config or {},
        "train_state": train_state or {},
        "extra": extra or {},
    }
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, slots in state["state"].items():
            for key, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().clone().cpu()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        meta["optimizer"] = {"param_groups": state["param_groups"], "scalars": scalars,
                             "slots": [str(i) for i in sorted(state["state"])]}
    header = {k: json.dumps(v) for k, v in meta.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Parse a checkpoint written by :func:`save_checkpoint`; any problem is a CheckpointError."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path} is a directory with no best.safetensors or last.safetensors")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = {k: json.loads(v) for k, v in header.items()}
    except (SafetensorError, OSError, ValueError, RecursionError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable kshot checkpoint ({str(e).splitlines()[0][:120]})") from None
    if meta.get("format") != FORMAT or "learner" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a kshot checkpoint (format "
                              f"{meta.get('format')!r}, expected {FORMAT!r})")
    _check_structure(path, meta)
    state_dict = {k[len("learner."):]: v for k, v in tensors.items() if k.startswith("learner.")}
    optimizer = None
    if "optimizer" in meta:
        om = meta["optimizer"]
        state: dict[int, dict[str, Any]] = {int(i): dict(om["scalars"].get(i, {})) for i in om["slots"]}
        for k, v in tensors.items():
            if k.startswith("optim."):
                parts = k.split(".", 2)
                if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) not in state:
                    raise CheckpointError(f"{path} holds an optimiser tensor {k!r} of no recorded slot; "
                                          f"it was not written by kshot, or has been edited")
                state[int(parts[1])][parts[2]] = v
        optimizer = {"state": state, "param_groups": om["param_groups"]}
    return Checkpoint(learner=meta["learner"], state_dict=state_dict, config=meta.get("config", {}),
                      train_state=meta.get("train_state", {}), optimizer=optimizer,
                      extra=meta.get("extra", {}))


def _check_structure(path: Path, meta: dict[str, Any]) -> None:
    """The header's JSON has the shape kshot writes; anything else is one CheckpointError line."""
    def wrong(field: str, wanted: str) -> CheckpointError:
        return CheckpointError(f"{path}: {field} must be {wanted}; the checkpoint was not written by "
                               f"kshot, or has been edited")

    learner = meta["learner"]
    if not isinstance(learner, dict) or not isinstance(learner.get("algo"), str):
        raise wrong("learner", "a mapping with the algorithm's name ('algo')")
    if not isinstance(learner.get("options", {}), dict):
        raise wrong("learner.options", "a mapping")
    model = learner.get("model")
    if (not isinstance(model, dict) or not isinstance(model.get("name"), str)
            or not isinstance(model.get("kwargs", None), dict)):
        raise wrong("learner.model", "a mapping of the backbone's 'name' and 'kwargs'")
    for key in ("config", "train_state", "extra"):
        if not isinstance(meta.get(key, {}), dict):
            raise wrong(key, "a mapping")
    state = meta.get("train_state", {})
    step = state.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise wrong("train_state.step", f"a non-negative integer, not {step!r}")
    if not isinstance(state.get("best_val"), (dict, type(None))):
        raise wrong("train_state.best_val", "a mapping")
    if "optimizer" in meta:
        om = meta["optimizer"]
        if (not isinstance(om, dict) or not isinstance(om.get("param_groups"), list)
                or not all(isinstance(g, dict) for g in om["param_groups"])
                or not isinstance(om.get("scalars"), dict)
                or not all(isinstance(v, dict) for v in om["scalars"].values())
                or not isinstance(om.get("slots"), list)
                or not all(isinstance(i, str) and i.isdigit() for i in om["slots"])):
            raise wrong("optimizer", "a mapping of 'param_groups', 'scalars' and 'slots' (the optimiser's "
                                     "state as kshot saves it)")
