"""The application the shipped job trains on, kept apart from the library (which never imports it): data, models,
the offline default assets, evaluation, and the process settings the entry points share."""
