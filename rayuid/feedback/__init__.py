"""Where follow-ups and verdicts come from: simulated users, judges, IFEval, personas."""
