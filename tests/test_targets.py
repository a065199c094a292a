"""The board registry: built-ins, a user's TOML, raw triples, TVM target JSON, and unknown names."""

from __future__ import annotations

import pytest
from tvm.target import codegen

from ohq_tvm import Precision
from ohq_tvm.errors import TargetError
from ohq_tvm.targets import builtin_board_names, list_boards, resolve_target
from ohq_tvm.targets.host import cpu_flags

EXPECTED = {
    # name: (mcpu, mattr, native fp16, dot product)
    "rpi4b": ("cortex-a72", ["+neon"], False, None),
    "rpi5": ("cortex-a76", ["+neon", "+dotprod", "+fullfp16"], True, "sdot"),
    "rk3588": ("cortex-a76", ["+neon", "+dotprod", "+fullfp16"], True, "sdot"),
    "jetson-orin-nano": ("cortex-a78ae", ["+neon", "+dotprod", "+fullfp16"], True, "sdot"),
}


def test_builtin_boards_are_all_there():
    assert builtin_board_names() == sorted(
        ["host", "rpi4b", "rpi5", "rk3588", "jetson-orin-nano", "aarch64-linux-gnu"]
    )
    assert [b.name for b in list_boards()] == builtin_board_names()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_arm_boards_build_their_tvm_targets(name):
    mcpu, mattr, fp16, dot = EXPECTED[name]
    board = resolve_target(name)
    target = board.tvm_target()
    assert target.attrs["mtriple"] == "aarch64-linux-gnu"
    assert target.attrs["mcpu"] == mcpu
    assert list(target.attrs["mattr"]) == mattr
    assert board.cross_triple == "aarch64-linux-gnu"  # this suite runs on x86-64
    assert board.precisions[0] is Precision.FP32
    assert (Precision.FP16 in board.precisions) is fp16
    assert board.dot_product == dot
    assert board.rpc_key == name


def test_host_board_describes_this_machine():
    board = resolve_target("host")
    assert board.tvm_target().attrs["mcpu"] == codegen.llvm_get_system_cpu()
    assert board.cross_triple is None
    vnni = bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})
    assert (board.dot_product == "vnni") is vnni
    assert (Precision.FP16 in board.precisions) is ("avx512_fp16" in cpu_flags())


def test_user_toml(tmp_path):
    path = tmp_path / "myboard.toml"
    path.write_text(
        'name = "orangepi"\nrpc_key = "opi"\nnum_cores = 8\nprecisions = ["int8", "fp32"]\n'
        'dot_product = "sdot"\n[target]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\n'
        'mcpu = "cortex-a55"\nmattr = ["+neon", "+dotprod"]\n'
    )
    board = resolve_target(str(path))
    assert (board.name, board.rpc_key, board.num_cores) == ("orangepi", "opi", 8)
    assert board.precisions == (Precision.FP32, Precision.INT8)
    assert board.tvm_target().attrs["mcpu"] == "cortex-a55"
    assert board.source == str(path)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('name = "x"\n', ["[target] table"]),
        ('precisions = ["fp32", "int3"]\n[target]\nkind = "llvm"\n', ["int3", "known precisions"]),
        ('dot_product = "amx"\n[target]\nkind = "llvm"\n', ["dot_product"]),
        ("[target\nkind = 1", ["not valid TOML"]),
    ],
)
def test_malformed_user_toml_names_the_file(tmp_path, body, words):
    path = tmp_path / "broken_board.toml"
    path.write_text(body)
    with pytest.raises(TargetError) as err:
        resolve_target(str(path))
    assert "broken_board.toml" in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_raw_triples():
    arm = resolve_target("armv7l-linux-gnueabihf")
    assert arm.cross_triple == "armv7l-linux-gnueabihf"
    assert arm.target_config == {"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf"}
    x86 = resolve_target("x86_64-linux-gnu")
    assert x86.cross_triple is None
    # The generic aarch64 board is a built-in and wins over the raw-triple reading.
    assert resolve_target("aarch64-linux-gnu").source == "builtin:aarch64-linux-gnu"


def test_a_board_description_resolves_to_itself():
    spec = resolve_target("rpi5")
    assert resolve_target(spec) is spec


def test_target_json():
    board = resolve_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53"}')
    assert board.name == "custom" and board.cross_triple == "aarch64-linux-gnu"
    assert board.tvm_target().attrs["mcpu"] == "cortex-a53"
    with pytest.raises(TargetError, match='needs a "kind"'):
        resolve_target('{"mtriple": "aarch64-linux-gnu"}')
    with pytest.raises(TargetError, match="malformed"):
        resolve_target('{"kind": ')


def test_unknown_name_lists_the_known_boards():
    with pytest.raises(TargetError) as err:
        resolve_target("raspberry-pi-9")
    message = str(err.value)
    assert "raspberry-pi-9" in message and "rpi4b" in message and "host" in message


def test_missing_board_file():
    with pytest.raises(TargetError, match="does not exist"):
        resolve_target("boards/nowhere.toml")


@pytest.mark.parametrize("kind", ["cuda", "c", "opencl"])
def test_targets_other_than_a_cpu_are_refused(tmp_path, kind):
    with pytest.raises(TargetError, match=rf"json: target kind '{kind}'.*\"llvm\""):
        resolve_target(f'{{"kind": "{kind}"}}')
    path = tmp_path / "gpu_board.toml"
    path.write_text(f'[target]\nkind = "{kind}"\n')
    with pytest.raises(TargetError, match=rf"gpu_board\.toml: target kind '{kind}'"):
        resolve_target(str(path))
