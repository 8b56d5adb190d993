"""What the API process and the workers share: settings, errors, job schema and store, adapter registry."""
