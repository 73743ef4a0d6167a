"""``python -m mmjax.kernels.compile_check``: the real TPU compiler, on this CPU machine.

These tests need libtpu (the ``tpu`` extra, which the README's test command installs). Outside
CI they are skipped when it is missing; in CI (``CI=true``) a missing libtpu is a failure, so
a Mosaic compile error can never land unseen.
"""

import os
import subprocess
import sys

import pytest

from mmjax.kernels import compile_check
from mmjax.kernels.common import BlockSizes

needs_libtpu = pytest.mark.skipif(
    not compile_check.libtpu_available() and not os.environ.get("CI"),
    reason='libtpu not installed: pip install -e ".[tpu]"')


def test_ci_has_libtpu():
    if os.environ.get("CI"):
        assert compile_check.libtpu_available(), 'CI must install the "tpu" extra'


def _custom_call(op_name, size):
    return ('%x = custom-call(%a), custom_call_target="tpu_custom_call", metadata={op_name="'
            f'{op_name}"}}, backend_config={{"used_scoped_memory_configs":[{{"memory_space":"1",'
            f'"offset":"0","size":"{size}"}}]}}')


def test_kernel_vmem_reads_each_kernels_scoped_memory_by_mask():
    text = "\n".join([
        _custom_call("jit(loss)/jvp(causal)/mmjax_retrieve_fwd_tpu/pallas_call", 2048),
        _custom_call("jit(loss)/transpose(jvp(skip64))/mmjax_retrieve_dq_tpu/pallas_call", 4096),
        _custom_call("jit(loss)/other_kernel/pallas_call", 1),
        "%y = add(%x, %x)"])
    assert compile_check.kernel_vmem(text) == {("causal", "fwd"): 2048, ("skip64", "dq"): 4096}


def test_a_failed_group_is_compiled_case_by_case(monkeypatch):
    """One mask that does not compile fails its own row only, with its own error."""
    class Lowered:
        def __init__(self, masks):
            self.masks = masks

        def compile(self):
            if "skip64" in self.masks:
                raise RuntimeError("Mosaic failed\nsecond line")
            return type("Compiled", (), {"as_text": lambda _: "\n".join(
                _custom_call(f"jit(loss)/jvp({m})/mmjax_retrieve_{k}_tpu/pallas_call", 1024)
                for m in self.masks for k in compile_check.KERNELS)})()

    monkeypatch.setattr(compile_check, "lower_group", lambda case, masks, mesh: Lowered(masks))
    group = [compile_check.Case("v4", BlockSizes(), 128, "float32", mask, 257)
             for mask in compile_check.MASKS]
    rows = compile_check.compile_group(group, mesh=None)
    assert [r["mask"] for r in rows] == list(compile_check.MASKS)
    assert [r["ok"] for r in rows] == [m != "skip64" for m in compile_check.MASKS]
    failed = rows[compile_check.MASKS.index("skip64")]
    assert failed["error"] == "RuntimeError: Mosaic failed second line"
    assert "NO" in compile_check.format_row(failed)
    assert rows[0]["vmem"] == {"fwd": 1024, "dkv": 1024, "dq": 1024}


@pytest.mark.parametrize("argv,message", [
    (["--generations", "v3"], "choose from"),
    (["--blocks", "512,512"], "6 integers"),
    (["--blocks", "512,512,256,512,512,64"], "TPU tiling rule"),
    (["--head_dims", "100"], "multiples of 16"),
    (["--lengths", "0"], "positive integers"),
    (["--masks", "diagonal"], "choose from"),
])
def test_bad_arguments_exit_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compile_check.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_without_libtpu_it_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(compile_check, "libtpu_available", lambda: False)
    assert compile_check.main(["--generations", "v5e"]) == 1
    assert 'pip install -e ".[tpu]"' in capsys.readouterr().err


def test_cases_cover_the_matrix():
    cases = list(compile_check.cases(("v4", "v5p"), (64, 128), ("bfloat16",), ("causal",),
                                     (257, 4096)))
    assert len(cases) == 8
    assert {c.blocks for c in cases} == {BlockSizes.for_platform("tpu", "v4"),
                                         BlockSizes.for_platform("tpu", "v5p")}
    explicit = BlockSizes(*(256,) * 6)
    assert {c.blocks for c in compile_check.cases(("v4",), (64,), ("float32",), ("causal",),
                                                  (257,), explicit)} == {explicit}


@needs_libtpu
@pytest.mark.parametrize("generation", compile_check.GENERATIONS)
def test_kernels_compile_for_each_generation(generation):
    """Forward, dkv and dq compile to tpu_custom_calls with Mosaic, with each default."""
    mesh = compile_check.tpu_mesh(generation)
    blocks = BlockSizes.for_platform("tpu", generation)
    groups = ([compile_check.Case(generation, blocks, 128, "bfloat16", mask, 257)
               for mask in compile_check.MASKS],
              [compile_check.Case(generation, blocks, 64, "float32", "window256", 1031)])
    for group in groups:
        for row in compile_check.compile_group(group, mesh):
            assert row["ok"], compile_check.format_row(row)
            assert set(row["vmem"]) == {"fwd", "dkv", "dq"}
            assert all(0 < size < 16 << 20 for size in row["vmem"].values()), row["vmem"]


@needs_libtpu
def test_blocks_that_do_not_fit_vmem_fail_the_check(capsys):
    argv = ["--generations", "v5e", "--head_dims", "128", "--dtypes", "float32", "--masks",
            "causal", "--lengths", "2048", "--blocks", ",".join(["2048"] * 6)]
    assert compile_check.main(argv) == 1
    out = capsys.readouterr().out
    assert "0 compiled, 1 failed" in out and "vmem" in out.lower()


@needs_libtpu
@pytest.mark.slow
def test_full_default_matrix_compiles():
    """The command as documented: every generation, head dim, dtype, mask and length."""
    result = subprocess.run([sys.executable, "-m", "mmjax.kernels.compile_check"],
                            capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    expected = (len(compile_check.GENERATIONS) * len(compile_check.DEFAULT_HEAD_DIMS)
                * len(compile_check.DEFAULT_DTYPES) * len(compile_check.MASKS)
                * len(compile_check.DEFAULT_LENGTHS))
    assert f"{expected} compiled, 0 failed" in result.stdout
