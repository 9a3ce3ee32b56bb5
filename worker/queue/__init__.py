"""The queue between the ingest and the workers, in one place: the events.apply message
contract and its seal (`contract`, `keys`), the publishers (`publish` for the ingest,
`republish` inside the service) and both transports (`redis_transport`,
`sqlite_transport`). Importing any of it connects to nothing, reads no settings and
changes no registry: a transport is served once its `register()` is called."""
