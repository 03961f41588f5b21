"""What the control plane does, one module per resource: jobs (`jobs`, with `admission`,
`references`, `submission`, `reconcile` and `job_reads`), files, tenants and their keys. Each takes
the `Core` (`context`): the database, Ray and the settings. HTTP lives in `service.routes`."""
