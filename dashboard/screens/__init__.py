"""Dashboard pages (run through st.navigation; not named pages/ so Streamlit never runs one on its own)."""
