"""What a federated semantic-communication run leaks, and defences against it.

    dp.py              DP-SGD on every client (Opacus), one accountant per client kept
                       on the node across rounds and resumes
    central_dp.py      central DP: Flower's fixed-clipping wrappers around our strategies
    label_leakage.py   split training: the norm and direction label-inference attacks
                       of Li et al. (ICLR 2022) on the gradients the server receives
    split_defences.py  client-side defences: Gaussian noise on the returned gradient,
                       label DP by randomized response
    mia.py             membership-inference attacks: loss, LiRA (online, offline),
                       RMIA (online, offline)
    mia_metrics.py     how membership-inference attacks are scored (AUC, TPR at low
                       FPR, empirical epsilon with Clopper-Pearson bounds)
    inversion.py       input reconstruction from split training's uplink

The drivers that run these on a finished run and write their reports are in reports/
(membership.py, label_leakage.py, inversion.py, privacy.py).
"""
