"""The application: workflows, system actors and the tree that supervises them."""
