"""Write the README's settings tables from the settings models (the one place each setting is described).

    python scripts/gen_settings_docs.py          # rewrite the block between the markers in README.md
    python scripts/gen_settings_docs.py --check  # exit 1 when README.md is out of date (tests/test_docs.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
README = ROOT / "README.md"
BEGIN, END = "<!-- settings:begin (scripts/gen_settings_docs.py) -->", "<!-- settings:end -->"


def _default(field: Any) -> str:
    if field.default_factory is not None:
        return ""
    value = field.default
    return "—" if value is None else f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def service_table() -> list[str]:
    from services.rollout.settings import RolloutSettings
    from services.teacher.settings import TeacherSettings

    t_fields, r_fields = TeacherSettings.model_fields, RolloutSettings.model_fields
    rows = ["| flag | env (`TOPD_TEACHER_*` / `TOPD_ROLLOUT_*`) | default teacher / rollout | meaning |",
            "|---|---|---|---|"]
    for name in t_fields | r_fields:
        t, r = t_fields.get(name), r_fields.get(name)
        field = t or r
        defaults = " / ".join(_default(f) if f is not None else "n/a" for f in (t, r))
        if t is not None and r is not None and _default(t) == _default(r):
            defaults = _default(t)
        rows.append(f"| `--{name.replace('_', '-')}` | `{name.upper()}` | {defaults} | {_cell(field.description or '')} |")
    return rows


def trainer_table() -> list[str]:
    from services.trainer.settings import GROUPS, TrainerSettings

    rows = ["| setting (`--set`, YAML) | flag | env `TOPD_TRAINER_*` | default | meaning |", "|---|---|---|---|---|"]
    for name, field in TrainerSettings.model_fields.items():
        if name in GROUPS:
            continue
        rows.append(f"| `{name}` | `--{name.replace('_', '-')}` | `{name.upper()}` | {_default(field)} | "
                    f"{_cell(field.description or '')} |")
    for group, model in GROUPS.items():
        rows.append(f"| **{group}** | | | | {_cell(model.__doc__ or '')} |")
        for name, field in model.model_fields.items():
            rows.append(f"| `{name}` | `--{group}.{name.replace('_', '-')}` | `{group.upper()}__{name.upper()}` "
                        f"or `{name.upper()}` | {_default(field)} | {_cell(field.description or '')} |")
    return rows


def render() -> str:
    return "\n".join([
        BEGIN,
        "",
        "**Teacher and rollout** (`topd teacher --help`, `topd rollout --help`; flag > env var > default):",
        "",
        *service_table(),
        "",
        "**Trainer** (`topd train --help`): flag > `--set key=value` > env var > `--config` YAML > default. A "
        "setting is named by its path (`optim.lr`) or its leaf name (`lr`); YAML files may be flat or nested.",
        "",
        *trainer_table(),
        "",
        END,
    ])


def updated(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + render() + tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = README.read_text()
    new = updated(text)
    if args.check:
        if new != text:
            print("README.md settings tables are out of date: run python scripts/gen_settings_docs.py")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
