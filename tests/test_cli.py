"""The dcp-native command line, run in a subprocess as a user runs it, on both engines.

Each command is a fresh interpreter that imports torch (about two seconds), so
a test starts the commands it needs at once and then waits for all of them.
Checkpoints come from dcp_native's writer and from stock DCP's, with a tensor
saved as two row chunks (as two ranks of a row-sharded tensor save it), in
two data files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

import dcp_native
from helpers import data_file, data_files, sidecar_file

WRITERS = ("native", "stock")
# torch warns at import when numpy is absent (our venvs have none); a user would silence
# it the same way. Everything else on stderr is the command's own.
QUIET = "ignore:Failed to initialize NumPy"


def state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "w": torch.randn(6, 5, generator=g),  # saved as two row chunks
            "b": torch.randn(5, generator=g).to(torch.bfloat16),
            "steps": torch.arange(4, dtype=torch.int64),
            "scale": torch.tensor(2.5),
            "empty": torch.zeros(0, 3),
        },
        "opt": {"lr": 0.1, "betas": (0.9, 0.99), "names": ["a", "b"]},
        "blob": b"\x00\x01raw",
        "step": 7,
    }


TENSORS = {"model.w", "model.b", "model.steps", "model.scale", "model.empty"}
OBJECTS = {"opt.lr", "opt.betas", "opt.names", "blob", "step"}


def flat(sd: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def assert_same(got: dict, want: dict) -> None:
    got, want = flat(got), flat(want)
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert isinstance(got[k], torch.Tensor), k
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            assert torch.equal(got[k], v), f"{k} differs"
        else:
            assert got[k] == v, k


class RowChunkPlanner(DefaultSavePlanner):
    """Saves the tensors named in ``split`` as two row chunks, as two ranks would."""

    def __init__(self, split: set[str]) -> None:
        super().__init__()
        self.split = split

    def create_local_plan(self):
        plan = super().create_local_plan()
        items = []
        for wi in plan.items:
            if wi.index.fqn not in self.split:
                items.append(wi)
                continue
            size = wi.tensor_data.size
            half = size[0] // 2
            for start, n in ((0, half), (half, size[0] - half)):
                offsets = torch.Size([start] + [0] * (len(size) - 1))
                sizes = torch.Size([n, *size[1:]])
                items.append(WriteItem(
                    index=MetadataIndex(wi.index.fqn, offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        ChunkStorageMetadata(offsets, sizes), wi.tensor_data.properties, size
                    ),
                ))
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, wi):
        if wi.index.fqn in self.split:
            chunk = wi.tensor_data.chunk
            return self.state_dict[wi.index.fqn].narrow(0, chunk.offsets[0], chunk.sizes[0])
        return super().resolve_data(wi)


def save(path: Path, writer: str) -> Path:
    # Without checksum tables: these tests are about the framing checks, and
    # test_verify_checks_crc32c_tables covers the checksums.
    if writer == "native":
        w = dcp_native.FileSystemWriter(path, thread_count=2, checksums=False)
    else:
        w = dcp.FileSystemWriter(path, thread_count=2)
    dcp.save(
        state(), storage_writer=w,
        planner=RowChunkPlanner({"model.w"}), no_dist=True,
    )
    return path


def storage(path: Path) -> dict:
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f).storage_data


@dataclasses.dataclass(repr=False)
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __repr__(self) -> str:  # what a failed assertion shows
        return f"$ {' '.join(self.args)}\n-> {self.returncode}\n{self.stdout}\n{self.stderr}"


#: First word of a command that runs the installed console script, not `python -m`.
SCRIPT = object()


def command_line(args: list) -> list[str]:
    if args and args[0] is SCRIPT:
        exe = Path(sys.executable).with_name("dcp-native")
        assert exe.exists(), f"{exe} is missing: reinstall with `pip install -e .`"
        return [str(exe)] + [str(a) for a in args[1:]]
    return [sys.executable, "-m", "dcp_native"] + [str(a) for a in args]


def run_all(commands: list[list], engine: str = "python") -> list[Result]:
    """Run ``dcp-native ARGS`` for each ARGS at once; wait for all."""
    env = {**os.environ, "DCP_NATIVE_BACKEND": engine, "PYTHONWARNINGS": QUIET}
    lines = [command_line(args) for args in commands]
    procs = [
        subprocess.Popen(line, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for line in lines
    ]
    results = []
    for line, proc in zip(lines, procs):
        out, err = proc.communicate(timeout=300)
        results.append(Result(line, proc.returncode, out, err))
    return results


def assert_user_error(res: Result, code: int = 2, *fragments: str) -> None:
    assert res.returncode == code, res
    assert "Traceback" not in res.stderr, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dcp-native: "), res
    for fragment in fragments:
        assert fragment in lines[0], res


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One intact checkpoint per writer, shared read-only by the tests that do not damage it."""
    root = tmp_path_factory.mktemp("ckpt")
    return {w: save(root / w, w) for w in WRITERS}


# --------------------------------------------------------------------------- inspect


def test_inspect(engine_name, checkpoints, tmp_path):
    text, as_json = run_all(
        [["inspect", checkpoints["native"]], ["inspect", "--json", checkpoints["stock"]]],
        engine_name,
    )
    assert text.returncode == 0 and as_json.returncode == 0, (text, as_json)
    assert text.stderr == "" and as_json.stderr == ""

    out = text.stdout
    assert "written by dcp_native" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["model.w"][1:5] == ["float32", "[6,", "5]", "120"]  # shape [6, 5], 120 B
    assert rows["model.w"][-2:] == ["2", "2"]  # 2 chunks in 2 files
    assert rows["model.b"][1:3] == ["bfloat16", "[5]"]
    assert rows["model.scale"][1:3] == ["float32", "[]"]
    assert rows["step"][1] == "int" and rows["step"][-1] == "7"
    assert rows["opt.betas"][1] == "tuple" and rows["blob"][1] == "bytes"
    assert "totals: 5 tensors (40 elements, 166 B), 5 objects" in out
    assert "2 data files" in out

    doc = json.loads(as_json.stdout)
    assert doc["written_by"] == "stock DCP" and doc["sidecar"] == "absent"
    tensors = {t["key"]: t for t in doc["tensors"]}
    objects = {o["key"]: o for o in doc["objects"]}
    assert set(tensors) == TENSORS and set(objects) == OBJECTS
    w = tensors["model.w"]
    assert (w["dtype"], w["shape"], w["numel"], w["bytes"]) == ("float32", [6, 5], 30, 120)
    assert w["chunks"] == 2
    assert sorted(w["files"]) == ["__0_0.distcp", "__0_1.distcp"]
    assert tensors["model.empty"]["shape"] == [0, 3] and tensors["model.empty"]["bytes"] == 0
    assert tensors["model.steps"]["dtype"] == "int64"
    assert objects["step"]["type"] == "int" and objects["step"]["value"] == 7
    assert objects["opt.lr"]["type"] == "float" and objects["opt.lr"]["value"] == 0.1
    assert objects["opt.names"]["type"] == "list" and "value" not in objects["opt.names"]
    assert all(o["bytes"] > 0 for o in objects.values())
    totals = doc["totals"]
    assert totals["tensors"] == 5 and totals["tensor_bytes"] == 120 + 10 + 32 + 4 + 0
    assert totals["files"] == 2
    assert totals["file_bytes"] == sum(
        os.path.getsize(checkpoints["stock"] / f) for f in ("__0_0.distcp", "__0_1.distcp")
    )


# --------------------------------------------------------------------------- verify


def test_verify_intact(engine_name, checkpoints):
    plain, full = run_all(
        [["verify", checkpoints["native"]],
         ["verify", "--read-all", "--json", checkpoints["stock"]]],
        engine_name,
    )
    assert plain.returncode == 0 and plain.stderr == "", plain
    assert "OK: intact" in plain.stdout
    assert "framing parsed for 6 tensor items and 5 object items" in plain.stdout
    assert full.returncode == 0, full
    doc = json.loads(full.stdout)
    assert doc["ok"] and doc["problems"] == [] and doc["read_all"]


def damage(path: Path, lose_file: bool) -> set[tuple]:
    """Three independent faults in one checkpoint; returns (file, key, offset) of each."""
    items = storage(path)
    f0, f1 = data_files(path)
    in_file = {
        f: sorted(
            (info.offset, idx.fqn, info.length) for idx, info in items.items()
            if info.relative_path == f
        )
        for f in (f0, f1)
    }
    # 1. Lose the second file, or truncate it inside its last item.
    if lose_file:
        os.remove(path / f1)
        faults = {(f1, None, None)}
    else:
        off, key, length = in_file[f1][-1]
        os.truncate(path / f1, off + length - 10)
        faults = {(f1, key, off)}
    # 2. Garbage over the first local header of one item, 3. over the end records of another.
    (head_off, head_key, _), (tail_off, tail_key, tail_len) = in_file[f0][-2:]
    with open(path / f0, "r+b") as f:
        f.seek(head_off)
        f.write(b"\xa5" * 40)
        f.seek(tail_off + tail_len - 30)
        f.write(b"\xa5" * 30)
    return faults | {(f0, head_key, head_off), (f0, tail_key, tail_off)}


def test_verify_damaged(engine_name, tmp_path):
    truncated = save(tmp_path / "truncated", "native")
    truncated_faults = damage(truncated, lose_file=False)
    lost = save(tmp_path / "lost-file", "stock")
    lost_keys = sorted({idx.fqn for idx, info in storage(lost).items()
                        if info.relative_path == "__0_1.distcp"})
    lost_faults = damage(lost, lose_file=True)

    text, as_json = run_all(
        [["verify", "--progress", "always", truncated], ["verify", "--json", lost]],
        engine_name,
    )
    for res in (text, as_json):
        assert res.returncode == 1, res
        assert "Traceback" not in res.stderr, res

    # Every fault is listed, each with its file, offset and key.
    assert "FAILED: 3 problems" in text.stdout, text
    for file, key, offset in truncated_faults:
        assert f"{file}, offset {offset}, key {key!r}: " in text.stdout, (key, text)
    assert "is truncated" in text.stdout and "no local header" in text.stdout
    assert "no end of central directory record" in text.stdout
    assert "verify [" in text.stderr and "100%" in text.stderr  # the progress bar

    doc = json.loads(as_json.stdout)
    assert not doc["ok"]
    found = {(p["file"], p["key"], p["offset"]) for p in doc["problems"]}
    assert found == lost_faults, doc["problems"]
    (missing,) = [p for p in doc["problems"] if p["key"] is None]
    assert missing["message"].startswith("the data file is missing")
    assert repr(lost_keys[0]) in missing["message"]


# --------------------------------------------------------------------------- convert


def test_convert_to_file(engine_name, checkpoints, tmp_path):
    whole, some = run_all(
        [["convert", checkpoints["native"], tmp_path / "all.pt"],
         ["convert", checkpoints["stock"], tmp_path / "some.pt", "--keys", "model.w", "opt"]],
        engine_name,
    )
    assert whole.returncode == 0 and some.returncode == 0, (whole, some)
    assert whole.stdout.startswith(f"wrote {tmp_path / 'all.pt'}: 5 tensors, 5 objects")
    assert_same(torch.load(tmp_path / "all.pt", weights_only=True), state())
    got = torch.load(tmp_path / "some.pt", weights_only=True)
    want = state()
    assert_same(got, {"model": {"w": want["model"]["w"]}, "opt": want["opt"]})


def test_convert_to_dcp(engine_name, tmp_path):
    src = tmp_path / "model.pt"
    torch.save(state(), src)
    whole, some = run_all(
        [["convert", src, tmp_path / "all"],
         ["convert", src, tmp_path / "some", "--keys", "model.", "step", "--flat"]],
        engine_name,
    )
    assert whole.returncode == 0 and some.returncode == 0, (whole, some)
    assert os.path.exists(sidecar_file(tmp_path / "all"))  # written by dcp_native
    # Read back with stock DCP, an independent reader.
    want = state()
    out = {
        "model": {k: torch.full_like(v, 9) for k, v in want["model"].items()},
        "opt": {"lr": None, "betas": None, "names": None},
        "blob": None,
        "step": None,
    }
    dcp.load(out, storage_reader=dcp.FileSystemReader(tmp_path / "all"), no_dist=True)
    assert_same(out, want)

    with open(tmp_path / "some" / ".metadata", "rb") as f:
        keys = set(pickle.load(f).state_dict_metadata)
    assert keys == TENSORS | {"step"}
    out = {k: torch.full_like(flat(want)[k], 9) for k in TENSORS}
    out["step"] = None
    dcp.load(out, storage_reader=dcp.FileSystemReader(tmp_path / "some"), no_dist=True)
    assert_same(out, {k: flat(want)[k] for k in out})


# --------------------------------------------------------------------------- user errors


def test_errors_and_help(checkpoints, tmp_path):
    """Exit codes and one-line messages of whole processes (no engine I/O: one engine)."""
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    missing_md = save(tmp_path / "missing-metadata", "stock")
    os.remove(missing_md / ".metadata")
    bad_md = save(tmp_path / "bad-metadata", "native")
    (bad_md / ".metadata").write_bytes(b"\x80\x04garbage")
    no_path, bad_arg, not_torch, no_md, garbled, helped = run_all([
        ["inspect", tmp_path / "nope"],
        ["inspect", "--bogus", checkpoints["native"]],
        ["convert", tmp_path / "notes.txt", tmp_path / "out"],
        ["verify", missing_md],
        ["verify", bad_md],
        [SCRIPT, "--help"],  # the installed console script, once
    ])
    assert_user_error(no_path, 2, "no such file or directory")
    assert_user_error(bad_arg, 2, "unrecognized arguments: --bogus")
    assert_user_error(not_torch, 2, "is not a torch.save file")
    assert not (tmp_path / "out").exists()

    # Data files without a readable .metadata: damaged (exit 1), not a wrong path (exit 2).
    for res in (no_md, garbled):
        assert res.returncode == 1 and res.stderr == "", res
    assert ".metadata: missing" in no_md.stdout and "__0_0." in no_md.stdout, no_md
    assert ".metadata: cannot be read as DCP metadata" in garbled.stdout, garbled

    assert helped.returncode == 0, helped
    for word in ("inspect", "verify", "convert", "exit codes:", "DCP_NATIVE_BACKEND"):
        assert word in helped.stdout
    for code in range(5):
        assert f"\n  {code}  " in helped.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["verify", "{tmp}/empty"], "is not a DCP checkpoint: it has no .metadata"),
        (["inspect", "{tmp}/notes.txt"], "is a file, not a DCP checkpoint"),
        (["convert", "{ck}", "{tmp}/x.pt", "--keys", "model.nope"], "'model.nope'"),
        (["convert", "{ck}", "{tmp}/exists.pt"], "exists (--force overwrites it)"),
        (["convert", "{tmp}/list.pt", "{tmp}/out"], "holds a list, not a state dict"),
        (["convert", "{ck}", "{tmp}/empty"], "is a directory"),
    ],
)
def test_user_errors_in_process(checkpoints, tmp_path, capsys, args, fragment):
    """More user errors, through cli.main in this process (the same code, no interpreter start)."""
    from dcp_native import cli

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "exists.pt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    argv = [a.format(tmp=tmp_path, ck=checkpoints["native"]) for a in args]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dcp-native: error: ") and fragment in lines[0]
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "out").exists()


def test_convert_refuses_absurd_declared_size(tmp_path, capsys):
    """A metadata file declaring a petabyte tensor is refused before anything is allocated."""
    from dcp_native import cli

    ck = tmp_path / "ck"
    dcp.save({"a": torch.ones(4)}, storage_writer=dcp_native.FileSystemWriter(ck), no_dist=True)
    with open(ck / ".metadata", "rb") as f:
        md = pickle.load(f)
    md.state_dict_metadata["a"].size = torch.Size([1 << 48])
    md.state_dict_metadata["a"].chunks[0].sizes = torch.Size([1 << 48])
    with open(ck / ".metadata", "wb") as f:
        pickle.dump(md, f)
    assert cli.main(["convert", str(ck), str(tmp_path / "out.pt")]) == 3
    err = capsys.readouterr().err
    assert "refusing to allocate" in err and "'a'" in err and len(err.splitlines()) == 1


def test_verify_checks_crc32c_tables(engine_name, tmp_path, capsys):
    """verify reads every byte of files with checksum tables and names a flipped bit's block."""
    from dcp_native import cli

    ck = tmp_path / "ck"
    sd = {"a": torch.randn(100000), "b": torch.randn(300), "o": "x"}
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(ck, checksums=True), no_dist=True)
    assert cli.main(["verify", str(ck)]) == 0
    assert "CRC32C of every 4 KiB block checked" in capsys.readouterr().out
    with open(data_file(ck), "r+b") as f:
        f.seek(200000)
        b = f.read(1)
        f.seek(200000)
        f.write(bytes([b[0] ^ 1]))
    assert cli.main(["verify", str(ck), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    (problem,) = doc["problems"]
    assert problem["file"] == os.path.basename(data_file(ck))
    assert problem["offset"] == 200000 // 4096 * 4096
    assert problem["key"] == "a" and "checksum mismatch" in problem["message"]


class Custom:
    """An object torch.load(weights_only=True) refuses (a class it does not know)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value


def test_convert_objects_follow_allow_pickle(engine_name, tmp_path, capsys):
    """convert refuses a custom object with a hint, and --allow-pickle converts it."""
    from dcp_native import cli

    ck = tmp_path / "ck"
    dcp.save({"w": torch.ones(3), "cfg": Custom(4)},
             storage_writer=dcp_native.FileSystemWriter(ck), no_dist=True)
    assert cli.main(["convert", str(ck), str(tmp_path / "a.pt")]) == 2
    assert "rerun with --allow-pickle" in capsys.readouterr().err
    assert cli.main(["convert", str(ck), str(tmp_path / "b.pt"), "--allow-pickle"]) == 0
    got = torch.load(tmp_path / "b.pt", weights_only=False)
    assert got["cfg"].value == 4 and torch.equal(got["w"], torch.ones(3))


def test_data_file_outside_the_checkpoint_is_never_read(engine_name, tmp_path, capsys):
    """A metadata that names a data file outside its directory is reported, and nothing there is read."""
    from dcp_native import cli

    ck = tmp_path / "ck"
    dcp.save({"a": torch.ones(4), "o": 3}, storage_writer=dcp_native.FileSystemWriter(ck), no_dist=True)
    os.replace(data_file(ck), tmp_path / "outside.distcp")
    with open(ck / ".metadata", "rb") as f:
        md = pickle.load(f)
    for info in md.storage_data.values():
        info.relative_path = "../outside.distcp"
    with open(ck / ".metadata", "wb") as f:
        pickle.dump(md, f)
    assert cli.main(["verify", str(ck), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]  # also: the sidecar is stale
    (problem,) = [p for p in problems if p["file"] == "../outside.distcp"]
    assert "leaves the checkpoint directory" in problem["message"]
    assert cli.main(["inspect", str(ck), "--json"]) == 0
    (obj,) = json.loads(capsys.readouterr().out)["objects"]
    assert obj["type"].startswith("unknown")  # its pickle was not read
