#!/usr/bin/env python3
"""Score study: other label-free scores tried on the shipped forecasters, beside the
numpy mirror of the detector in threshold_study.py. Final figures come from `satwatch eval`.

    ~/.cache/satwatch/venv/bin/python training/score_study.py [key=value ...]

Caches all 10 horizon steps of every forecast in /tmp/satwatch_forecasts_h10_<digest>.npz. Scores:
the shipped one (one-step error, EWMA, train-error stds, SPOT with floor, level novelty);
`low=1`: a low-side SPOT on a slowly smoothed error (`low_src=e1`) or value change
(`low_src=dx`), for anomalies where the signal goes quiet; `run_k`/`run_min`: the stuck score
(a value repeated exactly for more than run_k times the longest normal run and more than
run_min samples; shipped as stuck_run_factor / min_stuck_run). CALSKIP=1 in the environment
leaves scores above the fixed threshold out of SPOT's calibration. Prints test event
TP/FP/FN, precision, recall, point-wise F1, train events, and per channel
TP/FP/FN/train events where any is off.
"""
import os, re
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent


def build_cache():
    import onnxruntime as ort
    import numpy as np
    out={}
    for cfg in sorted((ROOT/"model_repository").glob("smap_*/config.pbtxt")):
        ch=cfg.parent.name[5:]
        p=dict(re.findall(r'key: "satwatch\.(\w+)" value: \{ string_value: "([^"]*)"', cfg.read_text()))
        center=np.array(p["norm_center"].split(","),np.float32); scale=np.array(p["norm_scale"].split(","),np.float32)
        so=ort.SessionOptions(); so.intra_op_num_threads=1
        sess=ort.InferenceSession(str(cfg.parent/"1/model.onnx"),so,providers=["CPUExecutionProvider"])
        for split in ("train","test"):
            x=np.load(ROOT/f"data/smap/{split}/{ch}.npy")
            z=((x-center)*(np.float32(1)/scale)).astype(np.float32)
            ends=np.arange(W-1,len(x)); idx=ends[:,None]+np.arange(-W+1,1)[None,:]
            f=np.concatenate([sess.run(["forecast"],{"window":z[idx[i:i+2048]]})[0] for i in range(0,len(ends),2048)])
            out[f"{ch}/{split}/x"]=x[:,0]
            out[f"{ch}/{split}/f"]=(f*scale[0]+center[0]).astype(np.float32)
        out[f"{ch}/cal"]=np.array([float(p["error_mean"]),float(p["error_std"])],np.float32)
    np.savez(CACHE,**out)


import collections, csv, json, sys, numpy as np
sys.path.insert(0, str(ROOT / 'training'))
from threshold_study import P2, gpd_quantile, events, repository_fingerprint, shipped_window
W=shipped_window();H=10
CACHE = Path(f"/tmp/satwatch_forecasts_h10_{repository_fingerprint()}.npz")
if not CACHE.exists():
    build_cache()
d=dict(np.load(CACHE))
labels={r["chan_id"]:json.loads(r["anomaly_sequences"]) for r in csv.DictReader(open(ROOT / 'data/smap/labeled_anomalies.csv'))}
CALSKIP=os.environ.get('CALSKIP')=='1'

class Spot:
    def __init__(s, cal, tq, risk, min_peaks, floor, fixed):
        s.cal,s.tq,s.risk,s.mp,s.floor,s.fixed=cal,tq,risk,min_peaks,floor,fixed
        s.est=P2(tq); s.n=0; s.pk=None; s.fitted=None
    def thr(s): return s.fixed if s.fitted is None else s.fitted
    def update(s, x, anom):
        if s.n < s.cal:
            if CALSKIP and x > s.fixed: return
            s.est.add(x); s.n+=1
            if s.n==s.cal: s.pk=[s.est.value(),0,0,0.0,0.0]
            return
        if anom and s.fitted is not None: return
        p=s.pk; p[1]+=1
        if x>p[0]:
            ex=x-p[0]; p[2]+=1; p[3]+=ex; p[4]+=ex*ex
        if p[2]>=s.mp: s.fitted=max(gpd_quantile(p[0],*p[1:],s.risk),s.floor)

def ewma_arr(e,a):
    out=np.empty(len(e)); s=None
    for i,v in enumerate(e):
        s=v if s is None else a*v+(1-a)*s; out[i]=s
    return out

def run(x,F,cal,S):
    n=len(x); an=np.zeros(n,bool)
    t=np.arange(W,n)
    e1=np.abs(x[t]-F[t-W,0]).astype(np.float64)
    mean,std=float(cal[0]),float(cal[1])
    sm=ewma_arr(e1,S['alpha']); sur=(sm-mean)/std
    hi=Spot(S['cal'],S['tq'],S['risk'],S['min_peaks'],S['floor'],S['fixed'])
    low=None
    if S.get('low'):
        src=e1 if S['low_src']=='e1' else np.abs(np.diff(x.astype(np.float64)))[t-1]
        slow=ewma_arr(src,S['low_alpha'])
        lowscore=-slow  # larger = quieter
        low=Spot(S['cal'],S['tq'],S['low_risk'],S['min_peaks'],-1e9,1e9)
    lo_=hi_=0.0; seen=0
    recent=collections.deque(); outside=0
    run_len=0; max_run=0; k=S['run_k']; mr=S['run_min']
    for j,i in enumerate(t):
        thr=hi.thr(); s=sur[j]; hi.update(s, s>thr); a=s>thr
        if low is not None:
            lt=low.thr(); ls=lowscore[j]
            la = ls>lt and (low.fitted is not None) and (-ls) < S['low_frac']*(-low.pk[0]) 
            low.update(ls, ls>lt)
            a = a or la
        if seen<640:
            lo_,hi_=(x[i],x[i]) if seen==0 else (min(lo_,x[i]),max(hi_,x[i])); seen+=1
        else:
            novelty=max(x[i]-hi_,lo_-x[i],0)/max(hi_-lo_,0.05)
            if novelty>S['level']: a=True
            if S['exc_samples']>0:
                out=novelty>S['exc_margin']; recent.append(out); outside+=out
                if len(recent)>640: outside-=recent.popleft()
                if outside>S['exc_samples']: a=True
        if k>0:
            if x[i]==x[i-1]: run_len+=1
            else:
                if not (run_len> max(k*max_run, mr)) or j-1-run_len<S['cal']: max_run=max(max_run,run_len)
                run_len=0
            if j-run_len>=S['cal'] and run_len> max(k*max_run, mr): a=True
        an[i]=a
    return an

def evaluate(S, chans=None, verbose=False):
    tp=fp=fn=ptp=pfp=pfn=tr_ev=0; per={}
    for ch in sorted(labels):
        if chans and ch not in chans: continue
        cal=d[f'{ch}/cal']
        trv=events(run(d[f'{ch}/train/x'],d[f'{ch}/train/f'],cal,S),S['gap']); tr_ev+=len(trv)
        x=d[f'{ch}/test/x']; ev=events(run(x,d[f'{ch}/test/f'],cal,S),S['gap'])
        L=labels[ch]
        ctp=sum(any(a<=e-1 and b>=s0 for a,b in ev) for s0,e in L); cfn=len(L)-ctp
        cfp=sum(not any(a<=e-1 and b>=s0 for s0,e in L) for a,b in ev)
        tp+=ctp;fn+=cfn;fp+=cfp
        lab=np.zeros(len(x),bool); det=np.zeros(len(x),bool)
        for s0,e in L: lab[s0:e]=True
        for a,b in ev: det[a:b+1]=True
        ptp+=(lab&det).sum(); pfp+=(det&~lab).sum(); pfn+=(lab&~det).sum()
        per[ch]=(ctp,cfp,cfn,len(trv))
    p=tp/max(tp+fp,1); r=tp/(tp+fn); pp=ptp/max(ptp+pfp,1); pr=ptp/(ptp+pfn)
    f1=2*p*r/(p+r) if p+r else 0
    print(f"TP {tp} FP {fp} FN {fn}  P {p:.3f} R {r:.3f} F1 {f1:.3f} pointF1 {2*pp*pr/(pp+pr):.3f} | train events {tr_ev}  {S}",flush=True)
    if verbose:
        print('  '+' '.join(f'{c}:{v[0]}/{v[1]}/{v[2]}/{v[3]}' for c,v in per.items() if v[1] or v[2] or v[3]))
    return per

BASE=dict(alpha=0.1,cal=640,tq=0.98,risk=1e-3,min_peaks=10,floor=2.5,fixed=10.0,gap=50,level=0.5,low=False,low_src='e1',low_alpha=0.02,low_risk=1e-3,low_frac=1.0,run_k=0.0,run_min=0,exc_samples=0,exc_margin=0.01)
if __name__=='__main__':
    S=dict(BASE)
    for kv in sys.argv[1:]:
        k,v=kv.split('='); S[k]=type(BASE[k])(v) if not isinstance(BASE[k],bool) else v=='1'
    evaluate(S,verbose=True)
