"""Data prep on Spark: the pieces of a split (prep/pieces.py) run as Spark tasks, then the same merge
publishes it on the driver. Two ways in:
- `run_pieces(job, master)`: what `data-prep json|text|hf --spark MASTER` does: task i writes piece i of
  the input (contiguous, in input order), read by the task itself from a path every executor sees
  (a shared folder, or a local one in `local[N]` mode);
- `dataframe_to_mds(df, out, spec)`: a DataFrame's text column (any source Spark reads: Delta, Parquet,
  a table), each partition a piece, as streaming's Spark-to-MDS converter takes a DataFrame.
Each task tokenizes on `spark.task.cpus` threads. A failed task fails the job and nothing is merged:
the split gets no index.json. PySpark is the `spark` extra; it needs Java 17 or newer.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import replace
from typing import Optional

from llmfoundry_lite.data.sources import Piece
from llmfoundry_lite.errors import DataError, UserError
from llmfoundry_lite.prep.convert import Summary, TokenizeSpec
from llmfoundry_lite.prep.pieces import PieceJob, check_piece, merge, write_piece


def session(master: str):
    """The active SparkSession, else a new one on `master` (e.g. local[2], spark://host:7077)."""
    try:
        from pyspark.sql import SparkSession  # lazy: the `spark` extra, only for --spark
    except ImportError:
        raise UserError("--spark needs PySpark: pip install 'llmfoundry_lite[spark]'") from None
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        raise UserError("Spark needs Java 17 or newer: install it (e.g. apt-get install openjdk-17-jre-headless) or "
                        "set JAVA_HOME")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors run this interpreter (local mode, same image)
    return SparkSession.getActiveSession() or SparkSession.builder.master(master).appName("llmfoundry-lite data-prep").getOrCreate()


def _task_cpus(spark) -> int:
    return int(spark.conf.get("spark.task.cpus", "1"))


def _collect(rdd):
    """`rdd.collect()`, a task's data-prep error (bad input) raised here as that error, not a Java trace."""
    try:
        return rdd.collect()
    except Exception as e:  # py4j's Py4JJavaError carries the Python worker's traceback as text
        for line in reversed(str(e).splitlines()):
            for kind in (DataError, UserError):
                prefix = f"{kind.__module__}.{kind.__name__}: "
                if line.startswith(prefix):
                    raise kind(f"a Spark task failed, so nothing was merged: {line[len(prefix):]}") from None
        raise


def run_pieces(job: PieceJob, master: str) -> PieceJob:
    """Every piece of `job` as a Spark task (`job.count` of them; 0: Spark's default parallelism); merge
    next (pieces.merge). Returns the job as run."""
    spark = session(master)
    count = job.count or spark.sparkContext.defaultParallelism
    check_piece(Piece(0, count), job.spec)
    job = replace(job, count=count, num_workers=_task_cpus(spark))
    _collect(spark.sparkContext.parallelize(range(count), count).map(job.run))
    return job


def dataframe_to_mds(df, out: str, spec: TokenizeSpec, text_column: str = "text", compression: Optional[str] = None,
                     realign: bool = False) -> Summary:
    """Tokenize (or, without a tokenizer, copy) a DataFrame's `text_column` into the MDS split `out`: one piece
    per partition, in partition order, then the merge."""
    if text_column not in df.columns:
        raise DataError(f"the DataFrame has no column '{text_column}' (columns: {df.columns}); choose one with text_column")
    count = df.rdd.getNumPartitions()
    write = _PartitionWriter(out, spec, count, compression, _task_cpus(df.sparkSession))
    _collect(df.select(text_column).rdd.mapPartitionsWithIndex(write))
    return merge(out, realign)


class _PartitionWriter:
    """Writes one DataFrame partition as a piece (a class, not a closure: it pickles to the executors)."""

    def __init__(self, out: str, spec: TokenizeSpec, count: int, compression: Optional[str], workers: int):
        self.out, self.spec, self.count, self.compression, self.workers = out, spec, count, compression, workers

    def __call__(self, index, rows):
        summary = Summary()
        write_piece((row[0] for row in rows), self.out, Piece(index, self.count), self.spec, {"source": "dataframe"},
                    self.compression, self.workers, "out", summary)
        yield index
