"""Print one table from a pytest-benchmark JSON file: median time, GB/s, share of copy bandwidth.

Usage: python benchmarks/table.py [--copy-gbps GBPS] BENCH_JSON [BENCH_JSON ...]

Several JSON files (say, one per gpu.sh stage) merge into one table; rows are the benchmarks with an
``impl`` parameter (bench_loss.py, bench_step.py). Every other benchmark (the SD 2.1 train step, say)
follows as one line: its name, median, IQR and ``extra_info``.
"""

import argparse
import json
from collections import defaultdict


def main(paths: list[str], copy_gbps: float | None) -> None:
    groups, others = defaultdict(dict), []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        for bench in report["benchmarks"]:
            impl = bench["params"].get("impl")
            if impl:
                groups[bench["group"]][impl] = (bench["stats"]["median"], bench["extra_info"]["GB/s"])
            else:
                others.append(bench)
        machine = report.get("machine_info", {})
        print(f"# {path}: {report.get('datetime', '')}  {machine.get('cpu', {}).get('brand_raw', '')}")
    header = f"{'benchmark':<36} {'impl':<16} {'median':>11} {'GB/s':>8}"
    header += f" {'% copy':>7}" if copy_gbps else ""
    header += f" {'vs torch':>9} {'vs compile':>11}"
    print(header)
    for group, rows in groups.items():
        for impl, (median, gbps) in rows.items():
            line = f"{group:<36} {impl:<16} {median * 1e3:>8.3f} ms {gbps:>8.1f}"
            if copy_gbps:
                line += f" {100 * gbps / copy_gbps:>6.0f}%"
            for base in ("torch", "compile"):
                ref = rows.get(base)
                line += f" {ref[0] / median:>8.2f}x" if ref else f" {'-':>9}"
            print(line)
    for bench in others:
        stats = bench["stats"]
        print(f"{bench['name']:<48} {stats['median']:>9.4f} s (IQR {stats['iqr']:.4f}) {bench['extra_info']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="BENCH_JSON")
    parser.add_argument("--copy-gbps", type=float, help="the card's copy bandwidth, for the '%% copy' column")
    args = parser.parse_args()
    main(args.paths, args.copy_gbps)
