"""The fault suite behind `banditgate bench faults`: each scenario in its own module.

Every scenario runs against a Kafka broker and a Redis that the suite starts for itself
(`harness.OwnStack`), never the shared development stack, with the gateway and the feedback
worker as real `banditgate serve` / `banditgate feedback` processes. Counts come from reading
the output topics back (predictions `read_committed`) and from Redis.
"""
