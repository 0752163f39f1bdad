"""Host-path row (any CPU): Python calls and launches of a fused training forward + backward with every
Triton launch stubbed, against eager's three modules (fastres/bench/host.py, in a fresh process because
Triton's interpreter must be switched on before triton loads). The figures go to extra_info."""
import json
import subprocess
import sys


def test_host_path_with_launches_stubbed(benchmark):
    out = {}

    def run():
        r = subprocess.run([sys.executable, "-m", "fastres.bench.host", "--json"], capture_output=True, text=True,
                           env={**__import__("os").environ, "TRITON_INTERPRET": "1"}, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        out.update(json.loads(r.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(out)
    print(f"\nhost path ({out['backend']}): {out['python_calls']} Python calls ({out['calls_ratio']:.1f}x eager), "
          f"launches train {out['train_launches']}, eval {out['eval_launches']}")
