"""Batch scoring inside the engines users already run: Ray Data, Apache Spark, Apache Beam.

core holds what every adapter shares (opening a servable once per process, rows to inputs, scoring
with bad rows isolated); ray_data, spark and beam each hold only their engine's idiom and import
that engine lazily, so `import runtime.integrations.core` needs none of them (extras kiln[ray],
kiln[spark], kiln[beam] install them).
"""
