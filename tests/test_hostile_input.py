"""Any Python object may arrive: a clear error or a correct step, never a crash, never a silent wrong answer.

Each case here crashed, hung, or silently computed the wrong thing before it
was fixed.  The cases that could take the interpreter down run in a child
interpreter, so that a regression fails one test instead of the whole run.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastadam
from conftest import assert_bitwise_equal

N = 1000


def problem(n: int = N, dtype=np.float32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(n), dtype), np.asarray(rng.standard_normal(n), dtype),
            np.asarray(rng.standard_normal(n), dtype) * 0.1, np.asarray(rng.random(n), dtype)]


def reference_after_one_step(arrays, **hyper) -> list[np.ndarray]:
    p, g, m, v = (a.copy() for a in arrays)
    fastadam.reference.adam_step(p, g, m, v, step=1, **hyper)
    return [p, g, m, v]


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; a crash shows as a non-zero exit."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


# -- sequences that lie about themselves ---------------------------------------------------------------

class LyingList(list):
    def __len__(self):
        return 2


class LyingTuple(tuple):
    def __len__(self):
        return 2


@pytest.mark.parametrize("betas", [LyingList(), LyingTuple(), LyingList([0.9]), LyingTuple((0.9, 0.99, 0.5))],
                         ids=["empty-list", "empty-tuple", "short-list", "long-tuple"])
def test_betas_whose_len_lies_are_refused_by_their_real_length(betas):
    arrays = problem()
    before = [a.copy() for a in arrays]
    with pytest.raises(TypeError, match=r"betas: expected a pair \(beta1, beta2\), got a Lying\w+ of \d"):
        fastadam.adam_step(*arrays, step=1, betas=betas)
    with pytest.raises(TypeError, match=r"betas: expected a pair"):
        fastadam.sparse_adam_step(arrays[0], np.array([1]), arrays[1][:1], arrays[2], arrays[3], step=1,
                                  betas=betas)
    for a, b in zip(arrays, before):
        assert_bitwise_equal(a, b)


def test_a_beta_whose_float_empties_the_betas_list_still_uses_both_values():
    betas = [None, 0.999]

    class Beta1(float):
        def __float__(self):
            betas.clear()  # drops the list's reference to beta2 while beta1 is converted
            return 0.9

    betas[0] = Beta1(0.9)
    arrays = problem()
    expected = reference_after_one_step(arrays, betas=(0.9, 0.999))
    fastadam.adam_step(*arrays, step=1, betas=betas)
    for a, e in zip(arrays, expected):
        assert_bitwise_equal(a, e)


# -- exceptions raised by the user's objects -------------------------------------------------------------

class Interrupting:
    """A number whose conversion is interrupted (Ctrl-C during __float__ / __index__)."""

    def __float__(self):
        raise KeyboardInterrupt

    def __index__(self):
        raise KeyboardInterrupt


@pytest.mark.parametrize("argument", ["lr", "eps", "weight_decay", "step", "num_threads", "grad_scale", "betas"])
def test_a_keyboard_interrupt_inside_a_conversion_propagates_as_is(argument):
    arrays = problem()
    before = [a.copy() for a in arrays]
    kwargs = {"step": 1, argument: Interrupting()}
    if argument == "betas":
        kwargs["betas"] = (0.9, Interrupting())
    with pytest.raises(KeyboardInterrupt):
        fastadam.adam_step(*arrays, **kwargs)
    for a, b in zip(arrays, before):
        assert_bitwise_equal(a, b)


def test_a_keyboard_interrupt_in_an_optimizer_hyperparameter_propagates_as_is():
    arrays = problem()
    opt = fastadam.Adam([arrays[0]])
    opt.param_groups[0]["lr"] = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        opt.step([arrays[1]])
    assert opt.steps == [0]


def test_other_errors_of_a_conversion_keep_their_type_and_message():
    class Broken:
        def __float__(self):
            raise ZeroDivisionError("the user's own error")

    with pytest.raises(ZeroDivisionError, match="the user's own error"):
        fastadam.adam_step(*problem(), step=1, lr=Broken())


def test_a_number_that_is_not_a_number_is_still_a_named_type_error():
    with pytest.raises(TypeError, match=r"lr: expected a real number, got str"):
        fastadam.adam_step(*problem(), step=1, lr="0.1")
    with pytest.raises(TypeError, match=r"step: expected an integer, got float"):
        fastadam.adam_step(*problem(), step=1.0)
    with pytest.raises(ValueError, match=r"step: integer out of range"):
        fastadam.adam_step(*problem(), step=2**64)


# -- byte order ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [">i2", ">i4", ">i8", ">u4"])
def test_indices_in_non_native_byte_order_are_refused_not_misread(dtype):
    # Read as native, big-endian 1 is row 256 (or 2^24, ...): that row used to be updated silently.
    table, g, m, v = (np.zeros((300, 4), np.float32) for _ in range(4))
    indices = np.array([1], dtype)
    with pytest.raises(TypeError, match=r"indices: indices in non-native byte order"):
        fastadam.sparse_adam_step(table, indices, g[:1], m, v, step=1)
    opt = fastadam.SparseAdam([table])
    with pytest.raises(TypeError, match=r"grads\[0\]\.indices: indices in non-native byte order"):
        opt.step([fastadam.RowSparseGrad(indices, g[:1])])
    assert not table.any() and not m.any() and not v.any()


def test_a_bfloat16_gradient_in_non_native_byte_order_is_refused_not_misread():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    p, _, m, v = problem()
    swapped = np.ones(N, ml_dtypes.bfloat16)
    swapped = swapped.view(swapped.dtype.newbyteorder(">"))
    before = [a.copy() for a in (p, m, v)]
    with pytest.raises(TypeError, match=r"grads: dtype must be float32 or float64, got bfloat16 \(non-native"):
        fastadam.adam_step(p, swapped, m, v, step=1)
    for a, b in zip((p, m, v), before):
        assert_bitwise_equal(a, b)


# -- callbacks that re-enter fastadam ------------------------------------------------------------------

def test_a_gradient_whose_del_steps_again_while_the_outer_call_finishes():
    # Another thread drops the caller's reference while the kernel runs (GIL
    # released); the gradient's last reference then goes inside fastadam's own
    # clean-up, and its __del__ calls fastadam again on the same thread.
    result = run_python("""
        import threading, time
        import numpy as np, fastadam

        inner_steps, outer_running = [], [False]
        class Grad(np.ndarray):
            def __del__(self):
                small = [np.ones(8, np.float32) for _ in range(4)]
                fastadam.adam_step(*small, step=1)
                inner_steps.append((outer_running[0], small[0][0]))

        n = 1 << 22
        for attempt in range(40):
            p, m, v = (np.zeros(n, np.float32) for _ in range(3))
            grads = [np.ones(n, np.float32).view(Grad)]
            dropper = threading.Thread(target=lambda: (time.sleep(0.001), grads.clear()))
            dropper.start()
            outer_running[0] = True
            try:
                fastadam.adam_step([p], grads, [m], [v], step=1, num_threads=2)
                assert p[0] == p[-1] < 0, (p[0], p[-1])
            except ValueError:  # emptied before the call began: this attempt missed the window
                pass
            outer_running[0] = False
            dropper.join()
        hits = [x for inside, x in inner_steps if inside]
        assert len(inner_steps) == 40 and all(x == inner_steps[0][1] for _, x in inner_steps), inner_steps
        assert len(hits) >= 5, f"only {len(hits)} of 40 attempts re-entered during the call"
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr


# -- thread counts -------------------------------------------------------------------------------------

@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer reserves terabytes of address space: no RLIMIT_AS test under it")
def test_an_absurd_thread_count_under_a_memory_limit_is_capped_not_fatal():
    # 4096 threads' stacks do not fit under the limit: the OpenMP runtime used
    # to print "Thread creation failed" and end the process.
    result = run_python("""
        import resource
        import numpy as np, fastadam
        arrays = [np.ones(1 << 22, np.float32) for _ in range(4)]
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        fastadam.adam_step(*arrays, step=1, num_threads=4096)
        assert 0.99 < arrays[0][0] < 1 and arrays[0][0] == arrays[0][-1]
        print("ok", fastadam.config()["max_threads"])
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
    assert "Thread creation failed" not in result.stderr


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs os.sched_getaffinity")
def test_calls_run_on_at_most_the_processors_this_process_may_use():
    if fastadam.config()["openmp"]:
        assert fastadam.config()["max_threads"] == len(os.sched_getaffinity(0))


# -- step counts ---------------------------------------------------------------------------------------

def test_the_step_count_cannot_overflow():
    p, g, m, v = problem()
    opt = fastadam.Adam([p])
    sd = opt.state_dict()
    sd["state"][0]["step"] = 2**63 - 2
    opt.load_state_dict(sd)
    opt.step([g])  # step number 2^63 - 1: the last one a 64-bit count holds
    assert opt.steps == [2**63 - 1]
    before = [a.copy() for a in (p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"])]
    with pytest.raises(ValueError, match=r"params\[0\] has taken 2\^63-1 steps"):
        opt.step([g])
    assert opt.steps == [2**63 - 1]
    for a, b in zip((p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"]), before):
        assert_bitwise_equal(a, b)


# -- arrays changed under the optimizer ------------------------------------------------------------------

def changed_dtype(a: np.ndarray) -> None:
    a.dtype = np.float64 if a.dtype == np.float32 else np.float32


def changed_to_int(a: np.ndarray) -> None:
    a.dtype = np.int32


def resized(a: np.ndarray) -> None:
    a.resize(a.size // 2, refcheck=False)  # a new, smaller buffer: the old pointer dangles


@pytest.mark.parametrize("change", [changed_dtype, changed_to_int, resized], ids=["float64", "int32", "resized"])
@pytest.mark.parametrize("which, name", [("param", r"params\[1\]"), ("exp_avg", r"the exp_avg of params\[1\]"),
                                         ("exp_avg_sq", r"the exp_avg_sq of params\[1\]")])
def test_an_array_changed_in_place_after_construction_is_caught_before_anything_is_written(change, which, name):
    # NumPy lets .dtype, .shape and .strides be reassigned; the kernel would
    # then read past the end of the gradient.
    first, second = problem(seed=1), problem(seed=2)
    opt = fastadam.Adam([first[0], second[0]])
    arrays_of_second = {"param": second[0], **opt.state[1]}
    change(arrays_of_second[which])
    untouched = [first[0], *opt.state[0].values(), *(a for k, a in arrays_of_second.items() if k != which)]
    before = [a.copy() for a in untouched]
    with pytest.raises(ValueError, match=name + r" changed after the optimizer was built"):
        opt.step([first[1], second[1]])
    for a, b in zip(untouched, before):
        assert_bitwise_equal(a, b)
    assert opt.steps == [0, 0]


def test_a_table_changed_in_place_is_caught_on_the_sparse_path_too():
    table = np.zeros((100, 8), np.float32)
    opt = fastadam.Adam([table])
    table.dtype = np.float64  # (100, 4) float64
    with pytest.raises(ValueError, match=r"params\[0\] changed after the optimizer was built \(its dtype"):
        opt.step([fastadam.RowSparseGrad(np.array([99]), np.ones((1, 4), np.float64))])


# -- two threads, one optimizer ------------------------------------------------------------------------

def test_a_step_re_entered_from_a_callback_is_refused():
    p, g, m, v = problem()
    opt = fastadam.Adam([p])

    class SteppingLr:
        def __float__(self):
            opt.step([g])  # a second step while the first one is being prepared
            return 1e-3

    opt.param_groups[0]["lr"] = SteppingLr()
    with pytest.raises(RuntimeError, match=r"the optimizer is already stepping"):
        opt.step([g])
    opt.param_groups[0]["lr"] = 1e-3
    opt.step([g])  # the flag was released
    assert opt.steps == [1]


def test_two_threads_stepping_one_optimizer_get_a_clear_error_never_a_torn_step():
    n = 1 << 22
    rng = np.random.default_rng(3)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    start = p.copy()
    opt = fastadam.Adam([p], num_threads=1)  # a long step, with the GIL released
    refused, barrier = [], threading.Barrier(2)

    def stepper():
        barrier.wait()
        for _ in range(10):
            try:
                opt.step([g])
            except RuntimeError as e:
                assert "already stepping" in str(e)
                refused.append(e)

    threads = [threading.Thread(target=stepper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    taken = opt.steps[0]
    assert taken + len(refused) == 20 and refused, "the threads never overlapped: the test proved nothing"
    expected, m, v = start.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for t in range(1, taken + 1):
        fastadam.reference.adam_step(expected, g, m, v, step=t)
    assert_bitwise_equal(p, expected)


# -- the floating-point mode ---------------------------------------------------------------------------

MXCSR_HELPER = r"""
#include <xmmintrin.h>
unsigned get_mxcsr(void) { return _mm_getcsr(); }
void set_mxcsr(unsigned x) { _mm_setcsr(x); }
"""


@pytest.fixture(scope="module")
def mxcsr(tmp_path_factory):
    """A small compiled helper that reads and sets the calling thread's MXCSR, as a fast-math library does."""
    import ctypes

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("MXCSR is x86-64's")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the helper")
    folder = tmp_path_factory.mktemp("mxcsr")
    (folder / "mxcsr.c").write_text(MXCSR_HELPER)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(folder / "mxcsr.so"), str(folder / "mxcsr.c")],
                   check=True)
    lib = ctypes.CDLL(str(folder / "mxcsr.so"))
    lib.get_mxcsr.restype = ctypes.c_uint
    lib.set_mxcsr.argtypes = [ctypes.c_uint]
    return lib


FTZ, DAZ, ROUND_UP = 0x8000, 0x0040, 0x4000


@pytest.mark.parametrize("mode", [FTZ | DAZ, ROUND_UP], ids=["ftz-daz", "round-up"])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_every_thread_computes_in_the_default_mode_whatever_the_caller_set(mxcsr, mode, num_threads):
    n = 1 << 20
    rng = np.random.default_rng(4)
    # Gradients near 1e-21: their squares, and so exp_avg_sq, are float32 subnormals.
    arrays = [rng.standard_normal(n).astype(np.float32), (rng.standard_normal(n) * 1e-21).astype(np.float32),
              (rng.standard_normal(n) * 1e-22).astype(np.float32), (rng.random(n) * 1e-42).astype(np.float32)]
    expected = reference_after_one_step(arrays, eps=1e-30)
    assert (np.abs(expected[3]) < np.finfo(np.float32).tiny).sum() > n // 2  # the case is about subnormals

    saved = mxcsr.get_mxcsr()
    mxcsr.set_mxcsr(saved | mode)
    try:
        fastadam.adam_step(*arrays, step=1, eps=1e-30, num_threads=num_threads)
        after = mxcsr.get_mxcsr()
    finally:
        mxcsr.set_mxcsr(saved)

    for a, e in zip(arrays, expected):
        assert_bitwise_equal(a, e)
    assert after & ~0x3F == (saved | mode) & ~0x3F  # the caller's mode is back (sticky flags aside)
