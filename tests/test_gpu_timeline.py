"""scripts/gpu_timeline.py's accounting of a kernel timeline: steps, idle and overlapping time, per-kernel sums and
per-layer times, on a timeline built by hand where every figure is known exactly (no GPU needed)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import gpu_timeline  # noqa: E402

US = 1000  # the timeline is in ns


def _layer(t: int, mixed: bool) -> tuple[list, int]:
    """one layer from t (µs): rope Q, rope K, then either hh_attn alone or hh_attn beside flash attention on another
    stream, then the output projection; returns its lines and the time it ends"""
    k = [(t, t + 2, 7, "void rope_norm<true>(float const*)"),
         (t + 3, t + 5, 7, "void rope_norm<true>(float const*)"),
         (t + 6, t + 14, 8 if mixed else 7, "void hh_attn<4, 4>(char const*, long)")]
    if mixed:
        k += [(t + 6, t + 10, 7, "void flash_attn_ext_vec<128, 1>(char const*)"),
              (t + 10, t + 12, 7, "void flash_attn_combine_results<128>(float const*)")]
    k += [(t + 15, t + 20, 7, "void mul_mat_vec_q<(ggml_type)2, 1>(void const*)")]
    return k, t + 20


def test_steps_idle_overlap_and_layers_are_counted_exactly(tmp_path):
    lines, t = [], 0
    for _ in range(3):  # three steps of two layers (hh, then mixed), 100 µs apart
        for mixed in (False, True):
            k, t = _layer(t, mixed)
            lines += k
        t += 100
    f = tmp_path / "tl.txt"
    # per step the host's calls and copies, on the same clock: a graph launch (11 µs, still running when the step starts
    # on the GPU) and two input copies (1 µs each, 64 and 16 bytes) before each step; the first step's come before the
    # counted window (its start), left out; the last step's start inside it and count
    host = []
    for st in (0, 140, 280):
        host += [f"api {(st - 10) * US} {(st + 1) * US} 7 cudaGraphLaunch_v10000\n",
                 f"api {(st - 20) * US} {(st - 19) * US} 7 cudaMemcpyAsync_v3020\n",
                 f"api {(st - 18) * US} {(st - 17) * US} 7 cudaMemcpyAsync_v3020\n",
                 f"memcpy {(st - 5) * US} {(st - 4) * US} 13 64 1 0\n", f"memcpy {(st - 4) * US} {(st - 3) * US} 13 16 1 0\n"]
    f.write_text("".join(f"{a * US} {b * US} {s} 1 8 1 1 {n}\n" for a, b, s, n in lines) + "".join(host))

    ks = gpu_timeline.read_all(str(f))[0]
    assert {k[3] for k in ks} == {"rope_norm", "hh_attn", "flash_attn_ext_vec", "flash_attn_combine_results", "mul_mat_vec_q"}
    sts = gpu_timeline.steps(ks, 20 * US)
    assert [len(s) for s in sts] == [10, 10, 10]

    st = gpu_timeline.step_stats(sts[0])
    assert st["wall"] == 40.0
    # per layer: idle 2-3, 5-6, 14-15 (the mixed layer's attention covers 6-14 as well): 3 µs, twice
    assert st["idle"] == 6.0
    # the mixed layer: hh_attn 6-14 beside flash attention 6-10 and its combine 10-12
    assert st["overlap"] == 6.0
    assert st["per"]["hh_attn"] == (2, 16 * US)
    assert st["streams"] == 2

    assert gpu_timeline.layer_times(sts[0]) == [("hh", 9.0, 15.0), ("mixed", 9.0, 15.0)]
    s = gpu_timeline.summarize(sts)
    assert s["steps"] == 3 and s["wall_us"] == 40.0
    # steps start at 0, 140, 280 (40 µs of kernels, then 100 with none)
    assert s["period_us"] == 140.0 and s["between_us"] == 100.0 and s["period_min"] == s["period_max"] == 140.0
    assert "| a token: step start to the next step's start [min-max] / of it between steps | 140.0 [140-140] / 100.0 |" in gpu_timeline.table([("x", s)])

    # the window is [0, 280): the calls and copies of the steps at 140 and 280 fall in it, per token (2 tokens) one each
    h = gpu_timeline.host_per_token(sts, *gpu_timeline.read_all(str(f))[1:])
    assert h["calls"] == {"cudaGraphLaunch_v10000": {"per_token": 1.0, "us": 11.0}, "cudaMemcpyAsync_v3020": {"per_token": 2.0, "us": 2.0}}
    assert h["copies"] == {"HtoD": {"per_token": 2.0, "bytes": 80.0}}
    t = gpu_timeline.host_table([("x", {**s, "host": h})])
    assert "| every runtime call | 13.0 |" in t and "| copies HtoD: count, bytes | 2, 80 |" in t
    assert s["layers"]["mixed"] == {"per_step": 1.0, "attention_us": 9.0, "to_out_proj_us": 15.0}
    assert s["kernels"]["flash_attn_ext_vec"] == {"launches": 1, "us": 4.0}
    assert "| mixed layer" in gpu_timeline.table([("x", s)])
