"""HTTP, one module per resource: routes translate requests into `service.core` calls and records
into `service.schemas`; what `core` refuses becomes an HTTP answer in `errors`."""
