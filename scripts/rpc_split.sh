#!/usr/bin/env bash
# Issue 15: a fastgen GGUF with its layers split across two RPC servers (llama.cpp's own ggml-rpc-server and
# --rpc, nothing home-made) against the same GGUF in one process: llama-perplexity's KL-divergence mode over
# the pinned essays, at an n_ctx past the heavy-hitter budgets (eviction runs) and a ubatch small enough
# for the fused op. Builds the two tools in their own folder (scripts/build_tools.sh).
#   scripts/rpc_split.sh MODEL.gguf [OUT.json]          (RPC_BUILD=dir reuses a build)
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
G=$1 OUTJ=${2:-out/rpc-split.json} B=${RPC_BUILD:-.cache/build-rpc}
CTX=${CTX:-2048} UB=${UB:-16} CHUNKS=${CHUNKS:-2}
echo "==> building ggml-rpc-server and llama-perplexity with GGML_RPC in $B (log $B.log)"
TOOLS_BUILD=$B scripts/build_tools.sh ggml-rpc-server llama-perplexity > /dev/null
export LD_LIBRARY_PATH="$B/bin"
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
python -c 'import sys; from llama_fastgen.evaluation import tasks; open(sys.argv[1], "w").write(tasks.essays()[0][:60000])' "$W/text.txt"
ports=$(python -c 'import socket
for _ in range(2):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
set -- $ports
"$B/bin/ggml-rpc-server" -p "$1" -t 1 > "$W/rpc1.log" 2>&1 &
"$B/bin/ggml-rpc-server" -p "$2" -t 1 > "$W/rpc2.log" 2>&1 &
sleep 2
A=(-m "$G" -f "$W/text.txt" -c "$CTX" -b "$CTX" -ub "$UB" --chunks "$CHUNKS" -fa on -t "$(nproc)" --kl-divergence-base "$W/base.kld")
echo "==> one process (CPU)"
"$B/bin/llama-perplexity" "${A[@]}" > "$W/base.log" 2>&1 || { tail -20 "$W/base.log"; exit 1; }
echo "==> layers split over RPC servers 127.0.0.1:$1 and 127.0.0.1:$2"
"$B/bin/llama-perplexity" "${A[@]}" --kl-divergence --rpc "127.0.0.1:$1,127.0.0.1:$2" -ngl 99 -lv 4 > "$W/rpc.log" 2>&1 || { tail -20 "$W/rpc.log"; exit 1; }
grep -E "llama_kv_cache_fastgen|KV buffer size|model buffer size" "$W/rpc.log" | sed "s/^[0-9.]* I //" || true
mkdir -p "$(dirname "$OUTJ")"
python - "$W/rpc.log" "$OUTJ" "$G" "$CTX" "$UB" "$CHUNKS" "$*" <<'EOF'
import json, platform, re, subprocess, sys, time
log, out, gguf, ctx, ub, chunks = sys.argv[1:7]
t = open(log).read()
def num(pat):
    m = re.search(pat, t)
    return float(m.group(1)) if m else None
res = {"command": "scripts/rpc_split.sh " + gguf + " " + out, "gguf": gguf, "n_ctx": int(ctx), "n_ubatch": int(ub),
       "chunks": int(chunks),
       "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
                 + ("+dirty" if subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip() else ""),
       "machine": {"cpu": platform.processor() or platform.machine(), "system": platform.platform()},
       "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
       "devices": sorted(set(re.findall(r"using device (RPC\d+ \([^)]*\))", t))),
       "fastgen_cache": re.findall(r"llama_kv_cache_fastgen: (KV cache .*)", t),
       "ppl_split": num(r"Mean PPL\(Q\)\s*:\s*([\d.]+)"), "ppl_one_process": num(r"Mean PPL\(base\)\s*:\s*([\d.]+)"),
       "kld_mean": num(r"Mean\s+KLD:\s*([-\d.e]+)"), "kld_max": num(r"Maximum KLD:\s*([-\d.e]+)"),
       "same_top_pct": num(r"Same top p:\s*([\d.]+)")}
json.dump(res, open(out, "w"), indent=1)
print(json.dumps({k: res[k] for k in ("devices", "ppl_one_process", "ppl_split", "kld_mean", "kld_max", "same_top_pct")}))
if not res["devices"] or res["kld_max"] is None:
    sys.exit("rpc_split: the split run did not report what it should; see the log above")
EOF
echo "wrote $OUTJ"
