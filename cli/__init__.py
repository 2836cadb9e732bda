"""The `calibflow` command line: above the library, beside tasks/ and flows/.

Exit codes, for CD: 0 success (gate passed, model registered or promoted); 1 the model was
rejected (data validation, a gate, or a registry model whose metrics do not reproduce); 2 the
command could not decide or run as asked (bad params, data not pinned by DVC, a version or the
data at its recorded revision not found, the registry unreachable, a promotion that lost a race).
Which error gives which code is calibflow.errors' policy, read by cli.main's one dispatcher.
"""
