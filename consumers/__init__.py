"""Kafka consumption and sample building (DESIGN §3-4): a leaf package.

Flow: ``source`` (Kafka, offsets) -> ``decode`` (validate, DLQ reasons) -> ``joiner``
(event-time labels, ``history``, ``timefeatures``, ``negatives``, ``popularity``) ->
sample batches (``schema``), wired by ``pipeline.IngestPipeline``; ``runtime`` builds the
Kafka-backed pipeline and runs the standalone join; ``arrow_io`` puts batches on a topic.

Import the submodules directly: this package imports nothing on purpose, so that
``consumers.schema`` stays cheap for code that only needs the contracts.
"""
