"""Building blocks of the cluster mode (issue 11): several regproxy nodes
sharing one cache, its blobs in an S3 bucket (:mod:`.s3`) and its index in
PostgreSQL (:mod:`.pg`).  Both wrap blocking client libraries, each call on
a bounded thread pool the caller owns, never on the reactor thread."""
