"""Where keyframes come from: ROS bags, geotagged image folders, pose tracks and pose messages, GPS/UTM geodesy."""
