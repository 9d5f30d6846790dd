"""The compute REST API: one module per resource (servers, migrations, hosts and aggregates,
flavors); each parses, calls one service or selector, renders."""
