"""Job webhooks: where a `webhook_url` may point (targets), how deliveries are signed (signing),
and the sender of the delivery outbox that app.jobs.lifecycle writes (dispatch)."""
