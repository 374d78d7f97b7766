"""README's settings tables are generated from the settings models; they must not drift."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_settings_tables_are_up_to_date():
    res = subprocess.run([sys.executable, "scripts/gen_settings_docs.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_trainer_leaf_name_is_unique_and_documented():
    from services.trainer.settings import GROUPS, TrainerSettings, leaf_paths

    paths = leaf_paths()  # raises on a duplicate leaf name
    assert set(paths) == ({n for n in TrainerSettings.model_fields if n not in GROUPS}
                          | {n for m in GROUPS.values() for n in m.model_fields})
    for model in (TrainerSettings, *GROUPS.values()):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
