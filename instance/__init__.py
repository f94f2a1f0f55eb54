"""Instance worker: one process per engine that serves tokens over HTTP and
reports its Llumnix load to Redis."""
