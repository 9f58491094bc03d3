"""prunescope's Streamlit dashboard: reads and writes run folders, calls the engine."""
