"""What a federated semantic-communication run leaks, and defences against it.

    label_leakage.py   split training: the norm and direction label-inference attacks
                       of Li et al. (ICLR 2022) on the gradients the server receives
    split_defences.py  client-side defences: Gaussian noise on the returned gradient,
                       label DP by randomized response

DP-SGD, central DP and membership-inference audits are not built yet.
"""
