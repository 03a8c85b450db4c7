"""Billing API: FastAPI app serving the meter registry, interval and billing-cycle reads.

Entry points: `api.app.create_app(settings)`, `api.settings.ApiSettings` (NBMETER_ prefix),
`api.serve.run(host, port, settings)`; `nbmeter api` and `nbmeter tenant create SLUG`.

Endpoints (all under Bearer API keys, scopes readings:read / meters:write / admin):
  POST/GET  /v1/meters                     register / list (cursor) meters
  GET/PATCH /v1/meters/{id}                one meter
  POST      /v1/meters/import              bulk import, JSON array or text/csv
  POST      /v1/meters/{id}/exchange       remove with final read, install successor
  GET       /v1/meters/{id}/health         last seen, register, flags, battery, radio
  GET       /v1/meters/{id}/alarms         open alarms; /v1/alarms for the tenant
  GET       /v1/meters/{id}/readings       interval reads, local-time steps 1h|1d|1mo
  GET       /v1/meters/{id}/cycles/{date}  cycle read with VEE issues, alarms, revisions
  POST/GET  /v1/meters/{id}/manual-reads   enter (quality 7) / list reads entered by people
  POST      /v1/reads/import               historical reads, CSV or JSON, all or nothing
  GET/PUT   /v1/billing-calendar           cycle day or explicit cycle start dates
  GET       /v1/cycles                     cycles in a range
  GET       /v1/cycles/{date}/reads        all meters: JSON page | NDJSON | CSV stream
  POST      /v1/cycles/{date}/close        publish every meter's boundary reads
  GET/POST  /v1/api-keys, DELETE /v1/api-keys/{key_id}
  GET       /healthz, /metrics, /openapi.json
"""
