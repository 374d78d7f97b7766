"""The built-in task's weights as shipped with the project, so a first run installs them in seconds
instead of training them for minutes.

`services/task/shipped/<cache key>/` holds what `prepare_builtin` builds for the `arith` preset and
seed 0: `teacher/` and `student/` (Hugging Face format), `teacher_samples.jsonl` and `build.json`
(the build's record, plus `files`: the sha256 of every file). Every file is checked against its hash
before anything is installed; a mismatch (a damaged checkout, a Git LFS pointer, an edited file) is
refused with the command that trains the weights here instead.

Maintainers refresh the bundle after a recipe change (a new cache version):
`topd prepare --rebuild` then `python -m services.task.shipped export`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from topd_client.errors import ConfigurationError

ROOT = Path(__file__).resolve().parent / "shipped"
SHIPPED_FILES = ("teacher", "student", "teacher_samples.jsonl")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> dict[str, Path]:
    """Relative name -> path of every shipped file under root (build.json excluded)."""
    out: dict[str, Path] = {}
    for name in SHIPPED_FILES:
        path = root / name
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                out[f.relative_to(root).as_posix()] = f
    return out


def find(key: str) -> Path | None:
    """The shipped bundle of this cache key, if the project has one."""
    bundle = ROOT / key
    return bundle if (bundle / "build.json").is_file() else None


def verify(bundle: Path) -> dict[str, Any]:
    """The bundle's build.json, after checking every listed file's sha256 (and that none is missing)."""
    info = json.loads((bundle / "build.json").read_text())
    want: dict[str, str] = info.get("files") or {}
    if not want:
        raise ConfigurationError(f"{bundle}/build.json lists no files: the shipped weights are incomplete")
    for name, digest in want.items():
        path = bundle / name
        got = sha256(path) if path.is_file() else "missing"
        if got != digest:
            raise ConfigurationError(f"shipped weights {path}: sha256 {got[:16]}... != {digest[:16]}... (damaged "
                                     "checkout, or a Git LFS pointer?); `topd prepare --rebuild` trains them here")
    return info


def install(bundle: Path, out: Path, progress: bool = False) -> dict[str, Any]:
    """Copy a verified bundle into the cache entry being built at `out`; returns its build record."""
    from services.task.models import progress_bar

    info = verify(bundle)
    with progress_bar(len(SHIPPED_FILES), "install shipped weights (sha256 checked)", progress, unit="part") as bar:
        for name in SHIPPED_FILES:
            src = bundle / name
            shutil.copytree(src, out / name) if src.is_dir() else shutil.copy2(src, out / name)
            bar.update(1)
    return {**{k: v for k, v in info.items() if k != "files"}, "source": "shipped", "shipped": str(bundle)}


def compare(bundle: Path, built: Path) -> dict[str, bool]:
    """Per model: are the weights built here byte-identical to the shipped ones?"""
    want = json.loads((bundle / "build.json").read_text()).get("files") or {}
    return {role: sha256(built / role / "model.safetensors") == want.get(f"{role}/model.safetensors")
            for role in ("teacher", "student")}


def export(entry: Path, root: Path | None = None) -> Path:
    """Write a trained cache entry as the shipped bundle of its key (replacing an older one) under
    root (default: the package's bundles)."""
    info = json.loads((entry / "build.json").read_text())
    if info.get("source") != "trained":
        raise ConfigurationError(f"{entry} was not trained here (source {info.get('source')!r}): rebuild it first")
    dest = (root or ROOT) / entry.name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in SHIPPED_FILES:
        src = entry / name
        shutil.copytree(src, dest / name) if src.is_dir() else shutil.copy2(src, dest / name)
    info = {k: v for k, v in info.items() if k not in ("matches_shipped", "shipped")}
    info["files"] = {name: sha256(path) for name, path in _files(dest).items()}
    (dest / "build.json").write_text(json.dumps(info, indent=1) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    """python -m services.task.shipped export [--data-dir D]: ship the `arith` entry trained in D."""
    import argparse

    from services.common.model_files import data_dir
    from services.task.models import DEFAULT_PRESET, preset
    from services.task.prepare import cache_key

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["export"])
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    entry = (args.data_dir or data_dir()) / cache_key(DEFAULT_PRESET, 0, preset(DEFAULT_PRESET))
    dest = export(entry)
    print(f"shipped {entry} -> {dest} ({sum(p.stat().st_size for p in _files(dest).values()) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
