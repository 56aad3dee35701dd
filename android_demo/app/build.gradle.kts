plugins {
    id("com.android.application")
}

android {
    namespace = "org.fedfleet.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.fedfleet.demo"
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") } // the ABIs executorch-android ships
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
        isCoreLibraryDesugaringEnabled = true // java.time (Retry-After dates) and streams on API 26
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }
}

dependencies {
    implementation(project(":fedclient"))
    implementation("org.pytorch:executorch-android:${property("executorchVersion")}")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("androidx.work:work-runtime:2.10.0")
    implementation("com.journeyapps:zxing-android-embedded:4.3.0")
    coreLibraryDesugaring("com.android.tools:desugar_jdk_libs:2.1.3")
}
