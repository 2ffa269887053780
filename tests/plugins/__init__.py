"""Tests of the routing plugin API, dispatcher, built-ins and author kit."""
