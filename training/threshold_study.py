#!/usr/bin/env python3
"""Threshold study: a numpy mirror of satwatch's detector (src/detect/), used to explore
label-free thresholds before writing them in Rust. Final figures come from `satwatch eval`.

    ~/.cache/satwatch/venv/bin/python training/threshold_study.py [key=value ...]

Runs the shipped ONNX forecasters over data/smap/{train,test} with onnxruntime (cached in
/tmp/satwatch_forecasts_<digest of the repository>.npz), then replays the detector in Python: one-step error, EWMA,
surprise in train-error stds, level novelty against the first 640 scores' range, and the
dynamic threshold (SPOT: P² initial quantile, method-of-moments generalised Pareto tail,
floor), and the stuck score (a value repeated exactly for more than `stuck` times the longest
normal run of repeats, and more than `stuck_min` samples; runs begun in the baseline are normal). Prints event TP/FP/FN, precision, recall and point-wise F1 on the test split and the
number of events on the train split (false alarms: it holds no labelled anomalies).
Settings as key=value: alpha, cal, tq, risk, min_peaks, floor, fixed, gap, stuck (0: off),
stuck_min. `training/score_study.py` tries other scores on the same cache.
"""

import csv, hashlib, json, re, sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "model_repository"


def shipped_window():
    """The shipped models' window (satwatch.window; train.py gives all of them the same)."""
    windows = {int(re.search(r'key: "satwatch\.window" value: \{ string_value: "(\d+)"', c.read_text())[1])
               for c in REPOSITORY.glob("smap_*/config.pbtxt")}
    if len(windows) != 1:
        sys.exit(f"expected one window across the shipped models, found {sorted(windows)}")
    return windows.pop()


def repository_fingerprint():
    """A digest of the shipped configs and models: caches of their forecasts are named by it,
    so a retrained repository never reads another repository's cached forecasts."""
    h = hashlib.sha256()
    for f in sorted(REPOSITORY.glob("smap_*/config.pbtxt")) + sorted(REPOSITORY.glob("smap_*/1/model.onnx")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


CACHE = Path(f"/tmp/satwatch_forecasts_{repository_fingerprint()}.npz")
W = shipped_window()


def forecasts():
    if CACHE.exists():
        return dict(np.load(CACHE))
    import onnxruntime as ort

    out = {}
    for cfg in sorted(REPOSITORY.glob("smap_*/config.pbtxt")):
        ch = cfg.parent.name[5:]
        p = dict(re.findall(r'key: "satwatch\.(\w+)" value: \{ string_value: "([^"]*)"', cfg.read_text()))
        center = np.array(p["norm_center"].split(","), np.float32)
        scale = np.array(p["norm_scale"].split(","), np.float32)
        sess = ort.InferenceSession(str(cfg.parent / "1/model.onnx"), providers=["CPUExecutionProvider"])
        for split in ("train", "test"):
            x = np.load(ROOT / f"data/smap/{split}/{ch}.npy")
            z = ((x - center) * (np.float32(1) / scale)).astype(np.float32)
            ends = np.arange(W - 1, len(x))
            idx = ends[:, None] + np.arange(-W + 1, 1)[None, :]
            f = np.concatenate([sess.run(["forecast"], {"window": z[idx[i:i + 2048]]})[0]
                                for i in range(0, len(ends), 2048)])
            out[f"{ch}/{split}/x"] = x[:, 0]
            out[f"{ch}/{split}/f0"] = (f[:, 0] * scale[0] + center[0]).astype(np.float32)
        out[f"{ch}/cal"] = np.array([float(p["error_mean"]), float(p["error_std"])], np.float32)
    np.savez(CACHE, **out)
    return out


class P2:
    """P² quantile estimator (Jain & Chlamtac 1985), as in src/detect/threshold.rs."""

    def __init__(self, p):
        self.p, self.q, self.n = p, [], [0.0, 1.0, 2.0, 3.0, 4.0]
        self.want = [0.0, 2 * p, 4 * p, 2 + 2 * p, 4.0]

    def add(self, x):
        q, n, p = self.q, self.n, self.p
        if len(q) < 5:
            q.append(x), q.sort()
            return
        if x < q[0]:
            q[0], k = x, 0
        elif x >= q[4]:
            q[4], k = x, 3
        else:
            k = max(i for i in range(4) if q[i] <= x)
        for i in range(k + 1, 5):
            n[i] += 1
        for i, inc in enumerate((0, p / 2, p, (1 + p) / 2, 1)):
            self.want[i] += inc
        for i in (1, 2, 3):
            d = self.want[i] - n[i]
            if (d >= 1 and n[i + 1] - n[i] > 1) or (d <= -1 and n[i - 1] - n[i] < -1):
                d = 1.0 if d > 0 else -1.0
                qp = q[i] + d / (n[i + 1] - n[i - 1]) * ((n[i] - n[i - 1] + d) * (q[i + 1] - q[i]) / (n[i + 1] - n[i])
                                                         + (n[i + 1] - n[i] - d) * (q[i] - q[i - 1]) / (n[i] - n[i - 1]))
                if not q[i - 1] < qp < q[i + 1]:
                    j = i + int(d)
                    qp = q[i] + d * (q[j] - q[i]) / (n[j] - n[i])
                q[i], n[i] = qp, n[i] + d

    def value(self):
        return self.q[2] if len(self.q) == 5 else self.q[min(len(self.q) - 1, int(self.p * len(self.q)))]


def gpd_quantile(t, normal, count, s1, s2, risk):
    mean = s1 / count
    var = s2 / count - mean * mean
    shape, scale = (0.0, mean) if var <= 0 else (0.5 * (1 - mean * mean / var), 0.5 * mean * (1 + mean * mean / var))
    ratio = risk * normal / count
    with np.errstate(all="ignore"):
        z = t - scale * np.log(ratio) if abs(shape) < 1e-9 else t + scale / shape * (ratio ** -shape - 1)
    return 1e6 if not np.isfinite(z) else min(z, 1e6)


def detect(x, f0, cal, s):
    mean, std = float(cal[0]), float(cal[1])
    n = len(x)
    anomalous = np.zeros(n, bool)
    smoothed, est, calibrated, peaks, fitted = None, P2(s["tq"]), 0, None, None
    lo = hi = 0.0
    seen = 0
    prev, run, from_baseline, longest = None, 0, True, 0
    limit = lambda longest: max(s["stuck"] * longest, s["stuck_min"])
    for i in range(W, n):
        in_baseline = seen < 640
        e = abs(float(x[i]) - float(f0[i - W]))  # forecast made at i - 1
        smoothed = e if smoothed is None else s["alpha"] * e + (1 - s["alpha"]) * smoothed
        surprise = (smoothed - mean) / std
        thr = s["fixed"] if fitted is None else fitted
        if calibrated < s["cal"]:
            est.add(surprise)
            calibrated += 1
            if calibrated == s["cal"]:
                peaks = [est.value(), 0, 0, 0.0, 0.0]  # t, normal, count, sum, sum_sq
        elif fitted is None or surprise <= thr:  # until fitted, every score teaches
            peaks[1] += 1
            if surprise > peaks[0]:
                ex = surprise - peaks[0]
                peaks[2] += 1; peaks[3] += ex; peaks[4] += ex * ex
            if peaks[2] >= s["min_peaks"]:
                fitted = max(gpd_quantile(peaks[0], *peaks[1:], s["risk"]), s["floor"])
        level = 0.0
        if seen < 640:
            lo, hi = (x[i], x[i]) if seen == 0 else (min(lo, x[i]), max(hi, x[i]))
            seen += 1
        else:
            level = max(x[i] - hi, lo - x[i], 0) / max(hi - lo, 0.05) / 0.5
        stuck = False
        if s["stuck"] > 0:
            if prev is not None and x[i] == prev:
                run += 1
            else:
                if from_baseline or run <= limit(longest):
                    longest = max(longest, run)
                run, from_baseline, prev = 0, in_baseline, x[i]
            stuck = not from_baseline and run > limit(longest)
        anomalous[i] = surprise > thr or level > 1 or stuck
    return anomalous


def events(anomalous, gap):
    out, start, last, run = [], None, None, 0
    for i, a in enumerate(anomalous):
        if a:
            start = i if start is None else start
            last, run = i, 0
        elif start is not None:
            run += 1
            if run >= gap:
                out.append((start, last)); start = None
    if start is not None:
        out.append((start, len(anomalous) - 1))
    return out


def main(argv):
    s = dict(alpha=0.1, cal=640, tq=0.98, risk=1e-3, min_peaks=10, floor=2.5, fixed=10.0, gap=50, stuck=2.0, stuck_min=50)
    for kv in argv:
        k, v = kv.split("=")
        s[k] = type(s[k])(float(v))
    data = forecasts()
    labels = {r["chan_id"]: json.loads(r["anomaly_sequences"])
              for r in csv.DictReader(open(ROOT / "data/smap/labeled_anomalies.csv"))}
    tp = fp = fn = ptp = pfp = pfn = train_events = 0
    for ch in sorted(labels):
        cal = data[f"{ch}/cal"]
        tr = detect(data[f"{ch}/train/x"], data[f"{ch}/train/f0"], cal, s)
        train_events += len(events(tr, s["gap"]))
        x = data[f"{ch}/test/x"]
        ev = events(detect(x, data[f"{ch}/test/f0"], cal, s), s["gap"])
        hit = lambda a, b: any(a <= end - 1 and b >= start for start, end in labels[ch])
        tp += sum(any(a <= end - 1 and b >= start for a, b in ev) for start, end in labels[ch])
        fn += sum(not any(a <= end - 1 and b >= start for a, b in ev) for start, end in labels[ch])
        fp += sum(not hit(a, b) for a, b in ev)
        lab, det = np.zeros(len(x), bool), np.zeros(len(x), bool)
        for start, end in labels[ch]:
            lab[start:end] = True
        for a, b in ev:
            det[a:b + 1] = True
        ptp += (lab & det).sum(); pfp += (det & ~lab).sum(); pfn += (lab & ~det).sum()
    p, r = tp / max(tp + fp, 1), tp / (tp + fn)
    pp, pr = ptp / max(ptp + pfp, 1), ptp / (ptp + pfn)
    print(f"{s}\ntest: TP {tp} FP {fp} FN {fn}  event P {p:.3f} R {r:.3f}  point F1 {2 * pp * pr / (pp + pr):.3f}"
          f"  | train events {train_events}")


if __name__ == "__main__":
    main(sys.argv[1:])
