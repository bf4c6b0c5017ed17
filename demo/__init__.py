"""`banditgate demo`: the whole closed loop on the local stack, with real models and a report.

It trains scikit-learn models on a dataset that ships with scikit-learn, exports them to ONNX
into a fresh model repository, writes a configuration, starts `banditgate serve` and
`banditgate feedback` as subprocesses, and plays a product service against them through Kafka:
requests, delayed outcomes, a covariate shift and a broken model release. A live view shows what
the bandit, the feedback worker and the drift monitors make of it; a report folder keeps it.

Modules: `scenario` (the script of the run, pure), `models` (training, export, repository),
`deployment` (config, topics, processes), `traffic` (the simulated product service),
`observe` (polls Redis, /metrics and the alerts topic), `telemetry` (what was seen, pure),
`checks` (the verdict, pure), `view` (terminal), `report` (markdown + PNG), `run` (assembly).
"""
