"""Tests of scripts/bench_report.py on figures captured from real runs.

    python3 -m unittest discover -s scripts -p 'test_*.py'

(tests/scripts.rs runs this as part of `cargo test`.) The fixtures in
scripts/testdata/ are `satwatch bench pipeline --replicas 1,2 --limit 200
--latency-rates 2000 --latency-seconds 0.5 --json` (core.raw.json) and
`satwatch plan --pipeline pipelines/smap.toml --channels A-1,T-1 --data
data/smap --start 128 --limit 40 --json` (plan.json); the expected cells
below are those figures as the report formats them.
"""
import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import unittest

import bench_report as br

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")


def fixture(name):
    return os.path.join(DATA, name)


def printed(fn, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    return out.getvalue()


class Temp(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="bench_report_test.")
        self.addCleanup(shutil.rmtree, self.dir)

    def path(self, name):
        return os.path.join(self.dir, name)


class PlanTest(Temp):
    def test_expected_prints_the_replay_totals_of_satwatch_plan(self):
        # Two channels, rows 128..168 past a 128-row window: all 80 scored.
        self.assertEqual(printed(br.cmd_expected, fixture("plan.json")).split(), ["80", "80", "2", "0"])

    def test_expected_refuses_a_plan_without_data(self):
        plan = br.load(fixture("plan.json"))
        del plan["replay"]
        br.dump(plan, self.path("plan.json"))
        with self.assertRaises(SystemExit) as e:
            br.cmd_expected(self.path("plan.json"))
        self.assertIn("satwatch plan --data", str(e.exception.code))

    def test_window_is_the_longest_model_window(self):
        self.assertEqual(printed(br.cmd_window, fixture("plan.json")).strip(), "128")

    def test_settings_take_the_batching_and_sink_from_the_plan(self):
        br.cmd_settings(fixture("plan.json"), self.path("settings.json"))
        s = br.load(self.path("settings.json"))
        self.assertEqual(s["max_queue_delay_us"], [2000])
        self.assertEqual(s["window"], [128])
        self.assertEqual(s["sink"]["max_batch_delay_ms"], 5)
        self.assertEqual((s["replay_linger_ms"], s["publisher_linger_ms"]), (0, 1))


class CoreTest(Temp):
    def core(self):
        br.cmd_core(fixture("core.raw.json"), self.path("core.json"), "measured")
        return br.load(self.path("core.json"))

    def test_core_keeps_the_runs_and_tolerates_log_lines_around_them(self):
        with open(fixture("core.raw.json")) as f:
            raw = f.read()
        with open(self.path("noisy.json"), "w") as f:
            f.write("2026-12-03T15:00:00Z  INFO model loaded\n" + raw + "\n")
        br.cmd_core(self.path("noisy.json"), self.path("core.json"), "measured")
        core = br.load(self.path("core.json"))
        self.assertEqual([r["channels"] for r in core["runs"]], [27, 54])
        self.assertEqual(core["source"], "measured")

    def test_core_refuses_runs_that_lack_a_figure(self):
        data = br.load(fixture("core.raw.json"))
        del data["runs"][1]["windows_per_s"]
        br.dump(data, self.path("broken.json"))
        with self.assertRaises(SystemExit) as e:
            br.cmd_core(self.path("broken.json"), self.path("core.json"), "measured")
        self.assertIn("lacks windows_per_s", str(e.exception.code))

    def test_core_section_tables_hold_the_measured_figures(self):
        settings = {"window": [128], "max_queue_delay_us": [2000]}
        text = "\n".join(br.core_section(self.core(), settings))
        # Core throughput: channels, samples, windows, elapsed, samples/s,
        # windows/s, shares, mean batch, CPU s, CPU s per elapsed s.
        self.assertIn("| 27 | 5,400 | 1,971 | 0.01 | 427,685 | 156,105 | 32.2 % | 0.0 % | 73.0 | 0.0 | 0.74 |", text)
        # Inference ceiling: µs per window as measured / the ceiling / free models.
        self.assertIn("| 27 | 156,105 | 617,015 | 25.3 % | 1,755,544 | 6.41 / 1.62 / 0.57 |", text)
        self.assertIn("| 54 | 343,042 | 1,155,343 | 29.7 % | 1,073,041 | 2.92 / 0.87 / 0.93 |", text)
        # Scaling: peak RSS in MiB, channel state, bytes per channel.
        self.assertIn("| 27 | 427,685 | 77.6 | 0.93 | 36,048 |", text)
        # In-process latency at 2,000 samples/s offered.
        self.assertIn("| 27 | 2,000 | 2,001 | 1,026 | 2.74 | 8.84 | 11.31 | 11.31 |", text)
        self.assertIn("The pipeline reaches 25 % (27 channels), 30 % (54 channels) of the bare inference rate.", text)
        self.assertIn("Throughput relative to 27 channels: 220 % at 54 channels.", text)
        self.assertIn("a constant 35.2 KiB per channel", text)
        # No one-thread or model-files runs were given: no such tables.
        self.assertNotIn("With one inference thread", text)

    def test_one_thread_runs_are_set_against_the_shipped_threads(self):
        core = self.core()
        one = json.loads(json.dumps(core))
        for r in one["runs"]:
            r["samples_per_s"] /= 2
            r["ratio_to_ceiling"] = 0.5
        text = "\n".join(br.one_thread_part(core, one))
        self.assertIn("| 27 | 213,842 | 617,015 | 50.0 % | 50 % | 25.3 % |", text)
        self.assertIn("reaches 50 % of its ceiling, against 25–30 % with 2 threads, at 50 % of their throughput", text)
        self.assertIn("The pipeline file keeps the faster setting.", text)

    def test_a_missing_bench_is_reported_not_measured(self):
        br.cmd_core("-", self.path("core.json"), "no bench subcommand")
        text = "\n".join(br.core_section(br.load(self.path("core.json")), {}))
        self.assertIn("Not measured: no bench subcommand", text)


class MetricsTest(Temp):
    SCRAPE = """\
# HELP satwatch_end_to_end_latency_seconds From ts to durable.
# TYPE satwatch_end_to_end_latency_seconds histogram
satwatch_end_to_end_latency_seconds_bucket{model="smap_A-1",le="0.001"} 0
satwatch_end_to_end_latency_seconds_bucket{model="smap_A-1",le="0.0025"} 30
satwatch_end_to_end_latency_seconds_bucket{model="smap_A-1",le="0.005"} 60
satwatch_end_to_end_latency_seconds_bucket{model="smap_A-1",le="+Inf"} 60
satwatch_end_to_end_latency_seconds_bucket{model="smap_T-1",le="0.001"} 0
satwatch_end_to_end_latency_seconds_bucket{model="smap_T-1",le="0.0025"} 20
satwatch_end_to_end_latency_seconds_bucket{model="smap_T-1",le="0.005"} 40
satwatch_end_to_end_latency_seconds_bucket{model="smap_T-1",le="+Inf"} 40
satwatch_end_to_end_latency_seconds_sum{model="smap_A-1"} 0.15
satwatch_end_to_end_latency_seconds_sum{model="smap_T-1"} 0.10
satwatch_end_to_end_latency_seconds_count{model="smap_A-1"} 60
satwatch_end_to_end_latency_seconds_count{model="smap_T-1"} 40
satwatch_dead_letters_total{reason="malformed_json"} 7
satwatch_dead_letters_total{reason="wrong_arity"} 3
satwatch_samples_consumed_total 1234
satwatch_inference_count_total{model="smap_A-1",version="1"} 300
satwatch_inference_exec_count_total{model="smap_A-1",version="1"} 4
"""

    def setUp(self):
        super().setUp()
        with open(self.path("metrics.txt"), "w") as f:
            f.write(self.SCRAPE)

    def test_histograms_merge_their_series_and_interpolate_as_prometheus_does(self):
        h = br.histogram(br.parse_metrics(self.path("metrics.txt")), "satwatch_end_to_end_latency_seconds")
        self.assertEqual(h["count"], 100)
        self.assertAlmostEqual(h["mean_s"], 0.0025)
        # Rank 50 lies in (0.001, 0.0025] holding 50 of them: its top.
        self.assertAlmostEqual(h["p50_s"], 0.0025)
        # Rank 99: 49 of the 50 in (0.0025, 0.005].
        self.assertAlmostEqual(h["p99_s"], 0.0025 + 0.0025 * 49 / 50)
        self.assertEqual(h["buckets"][-1], ["+Inf", 100])

    def test_a_quantile_in_the_last_bucket_is_its_lower_bound(self):
        self.assertEqual(br.histogram_quantile(0.99, [(0.001, 10), (math.inf, 20)]), 0.001)
        self.assertIsNone(br.histogram_quantile(0.5, [(0.001, 0), (math.inf, 0)]))

    def test_metric_sums_every_series_for_the_shells_waits(self):
        path = self.path("metrics.txt")
        self.assertEqual(printed(br.cmd_metric, path, "dead_letters").strip(), "10")
        self.assertEqual(printed(br.cmd_metric, path, "consumed").strip(), "1234")
        self.assertEqual(printed(br.cmd_metric, path, "latency_count").strip(), "100")
        figures = br.metric_figures(path)
        self.assertEqual(figures["mean_batch_size"], 75)


class RenderTest(Temp):
    def test_render_writes_the_report_and_keeps_the_backends_section(self):
        results = self.path("results")
        os.mkdir(results)
        br.cmd_core(fixture("core.raw.json"), os.path.join(results, "core.json"), "measured")
        br.cmd_settings(fixture("plan.json"), os.path.join(results, "settings.json"))
        br.cmd_machine(os.path.join(results, "machine.json"),
                       "date=2026-12-03 15:00 UTC", "cpu_model=Test CPU", "nproc=2", "memory=8.0 GiB",
                       "kernel=Linux 6", "rustc=rustc 1.90", "ort=ONNX Runtime 1.31.1", "postgres=postgres 15",
                       "satwatch=satwatch 0.1", "loadavg_start=0.1 0.1 0.1", "loadavg_end=0.2 0.2 0.2",
                       "total_s=42", "quick=1", "skip_e2e=1", "lat_samples=5000", "lat_seconds=5",
                       "results_dir=.local/bench/results")
        with open(os.path.join(results, "commands.txt"), "w") as f:
            f.write("target/release/satwatch bench pipeline --pipeline pipelines/smap.toml --json\n")
        out = self.path("BENCHMARKS.md")
        with open(out, "w") as f:
            f.write("# Benchmarks\n\nold figures\n\n## Backends (the GPU path)\n\nmeasured on a GPU\n")
        br.cmd_render(results, out)
        with open(out) as f:
            text = f.read()
        self.assertTrue(text.startswith("# Benchmarks\n\nGenerated by `scripts/bench.sh --quick --skip-e2e` on 2026-12-03 15:00 UTC;"), text[:200])
        self.assertIn("> **Quick mode**", text)
        self.assertIn("| CPU | Test CPU, `nproc` = 2 |", text)
        self.assertIn("target/release/satwatch bench pipeline --pipeline pipelines/smap.toml --json", text)
        self.assertIn("| 27 | 5,400 | 1,971 |", text)
        self.assertIn("## 2. End to end (broker and PostgreSQL)\n\nNot measured in this run (`--skip-e2e`).", text)
        self.assertIn("## 3. Latency at fixed offered loads\n\nNot measured in this run (`--skip-e2e`).", text)
        self.assertNotIn("old figures", text)
        self.assertTrue(text.endswith("## Backends (the GPU path)\n\nmeasured on a GPU\n"), text[-200:])


if __name__ == "__main__":
    unittest.main()
