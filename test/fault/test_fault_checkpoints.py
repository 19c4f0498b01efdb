"""Fault suite, malicious checkpoints: pickles that would run code or name globals outside the allow-list are refused
by ``load_model`` (weights_only loading) with a clear message, and their side effect never happens.

Every payload would create a marker file (or import a module that does) if it ran; each probe asserts the refusal
(:class:`CheckpointError`, one line saying why), that the marker does not exist, and that the module was never
imported. Files that are not pickles at all (a FIFO, a hostile safetensors header) must not hang or crash either.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
from pathlib import Path

import torch

from dinomix_ros.model.checkpoint import CheckpointError, CheckpointNotFoundError, load_model

KLASS = "malicious pickle"
TIMEOUT_S = 60.0


class _Reduce:
    """Pickles as ``func(*args)``: what a malicious checkpoint embeds."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle calling ``module.name(arg)``, written by hand (pickle.dumps would import the module)."""
    data = arg.encode()
    return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n"
            + b"X" + struct.pack("<I", len(data)) + data + b"\x85R.")


def _kinds(tmp: Path, marker: Path) -> list[tuple[str, Path]]:
    """(kind, file) of every malicious checkpoint, written under ``tmp``."""
    touch = f"touch {marker}"
    state = {"backbone.dino_model.cls_token": torch.zeros(1, 1, 4)}
    files: list[tuple[str, Path]] = []

    def save(name: str, obj: object, **kwargs: object) -> None:
        path = tmp / f"{name}.ckpt"
        torch.save(obj, path, **kwargs)
        files.append((name, path))

    def raw(name: str, data: bytes) -> None:
        path = tmp / f"{name}.ckpt"
        path.write_bytes(data)
        files.append((name, path))

    save("zip: os.system in hyper_parameters", {"state_dict": state, "hyper_parameters": _Reduce(os.system, touch)})
    save("zip: os.system as a tensor's neighbour", {**state, "x": _Reduce(os.system, touch)})
    save("legacy format: os.system", {"state_dict": state, "evil": _Reduce(os.system, touch)},
         _use_new_zipfile_serialization=False)
    save("zip: builtins.eval", {"state_dict": state, "e": _Reduce(eval, f"__import__('os').system('{touch}')")})
    save("zip: builtins.exec", {"state_dict": state, "e": _Reduce(exec, f"import os; os.system('{touch}')")})
    save("zip: subprocess.Popen", {"state_dict": state, "p": _Reduce(subprocess.Popen, ["touch", str(marker)])})
    save("zip: Path.touch", {"state_dict": state, "p": _Reduce(Path.touch, marker)})
    save("zip: a whole nn.Module", torch.nn.Linear(2, 2))
    raw("raw pickle: posix.system", _global_call("posix", "system", touch))
    raw("raw pickle protocol 0: os.system", f"cos\nsystem\n(S'{touch}'\ntR.".encode())
    raw("raw pickle: module with import side effect", _global_call("dinomix_pwned_module", "run", "x"))
    raw("raw pickle: builtins.getattr chain", b"\x80\x02cbuiltins\ngetattr\nq\x00cbuiltins\n__import__\nX\x02\x00\x00"
        b"\x00os\x85RX\x06\x00\x00\x00system\x86R.")
    raw("pickle.dumps of a payload object", pickle.dumps({"state_dict": _Reduce(os.system, touch)}))
    raw("safetensors: header length 2**60", struct.pack("<Q", 2**60) + b"{}")
    raw("safetensors: nested header", struct.pack("<Q", 20002) + b"{" + b"[" * 10000 + b"]" * 10000 + b"}")
    raw("truncated zip", (tmp / "zip: os.system in hyper_parameters.ckpt").read_bytes()[:300])
    fifo = tmp / "fifo.ckpt"
    os.mkfifo(fifo)
    files.append(("a FIFO instead of a file", fifo))
    return files


def test_malicious_checkpoints_are_refused_and_never_run(tmp_path: Path, fault_probe) -> None:
    marker = tmp_path / "outside" / "payload-ran"
    marker.parent.mkdir()
    module_dir = tmp_path / "modules"
    module_dir.mkdir()
    (module_dir / "dinomix_pwned_module.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef run(x): pass\n")
    sys.path.insert(0, str(module_dir))  # importable: a loader that imported it would run the marker line
    try:
        kinds = _kinds(tmp_path, marker)
        failures = []
        for kind, path in kinds:
            box: list[object] = []

            def run(path: Path = path) -> None:
                try:
                    box.append(load_model(path))
                except BaseException as exc:  # asserted below
                    box.append(exc)

            t = threading.Thread(target=run, daemon=True)
            t.start()
            t.join(TIMEOUT_S)
            outcome = box[0] if box else None
            ran = marker.exists() or "dinomix_pwned_module" in sys.modules
            refused = isinstance(outcome, (CheckpointError, CheckpointNotFoundError))
            fault_probe(KLASS, kind, crashed=not refused and outcome is not None, hung=t.is_alive(),
                        outside_touched=ran)
            if t.is_alive() or not refused or ran or "\n" in str(outcome).strip():
                failures.append(f"{kind}: hung={t.is_alive()} ran={ran} outcome={outcome!r}")
        assert len(kinds) >= 15
        assert not failures, "\n".join(failures)
    finally:
        sys.path.remove(str(module_dir))
