"""Reconciliation with DR's Events API: events DR has that refundsync never applied.

A webhook can be missed for good: an endpoint down past DR's 72 hours of retries, a
webhook DR disabled, a broker that lost its data. DR keeps 30 days of events behind
`GET /events`. A run lists the handled event types from the stored checkpoint minus an
overlap, records and publishes through `events.apply` every event that was never
recorded (or is stuck unfinished), and moves the checkpoint only over what it has
listed and published in full.

`plan` makes the decisions (the window, which listed event to publish, where the
checkpoint may move, what counts as drift) as pure functions of values; `run` only moves
values between Postgres, DR's API and the broker; `dr_api` is the client of DR's API.
"""
